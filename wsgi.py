"""The WSGI entry gunicorn serves: `gunicorn -c config/gunicorn.py wsgi:app`."""

from enclave.app import create_app

app = create_app()
