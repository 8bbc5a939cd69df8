"""Schema migrations, applied in name order by `python -m enclave migrate`.

Each module defines `apply(db, dialect)`, where `dialect` is "postgresql" or
"sqlite". A migration never imports the models: it states the schema as it
was at the time, so that later model changes do not rewrite history.
"""
