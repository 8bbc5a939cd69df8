"""Egress: the only way out of a sandbox, one allow-listed host at a time.

No sandbox has a network interface besides loopback. A session whose
`egress.allow` names hosts gets a path out, and only that:

- `sandbox`: the worker's side. Before the backend launches the session it
  prepares the session's directory (a unix socket bridged to the proxy by
  `bridge`, the in-sandbox relay, the CA bundle and the proxy variables) and
  writes the session's `policy` to Redis; both go when the session's job ends.
- `proxy` and `addon`: the egress proxy process (`python -m enclave.egress`),
  mitmproxy with an addon that authenticates each attempt by the session's
  proxy token, allows only listed `hosts` on ports 443 and 80, refuses
  literals and names that `resolver` finds on non-public addresses, dials the
  address it checked, reports every attempt as an `egress` event (and each
  denial as an audit row) before answering, and injects the session's
  service `bindings` on the hosts they are for, under the deployment's CA
  (`authority`).
"""
