"""`python -m enclave.egress`: run the egress proxy (see `enclave.egress.proxy`)."""

from enclave.egress.proxy import main

main()
