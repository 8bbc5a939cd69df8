#!/usr/bin/python3
"""GIT_ASKPASS of the clone step: answers git's credential prompts from a file.

git runs this with its prompt as the only argument, e.g.
`Username for 'https://github.com': ` then
`Password for 'https://x-access-token@github.com': `, and reads the answer from
its standard output. The token comes from the file `ENCLAVE_GIT_TOKEN_FILE`
names (mounted into the clone step alone), so it is never in an environment
variable, a command line or a URL. A prompt for any host but
`ENCLAVE_GIT_HOST` (a redirect, a proxy asking for credentials) gets nothing.

Standard library only: it runs on the sandbox image's Python.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

DEFAULT_USERNAME = "x-access-token"


def prompted_host(prompt: str) -> str:
    """The `host[:port]` of the URL git quotes in its prompt, lower-cased."""
    start, end = prompt.find("'"), prompt.rfind("'")
    if start < 0 or end <= start:
        return ""
    netloc = urlsplit(prompt[start + 1 : end]).netloc
    return netloc.rpartition("@")[2].lower()


def main(argv: list[str]) -> int:
    prompt = argv[1] if len(argv) > 1 else ""
    expected = os.environ.get("ENCLAVE_GIT_HOST", "").lower()
    if not expected or prompted_host(prompt) != expected:
        return 1

    if prompt.startswith("Username"):
        answer = os.environ.get("ENCLAVE_GIT_USERNAME") or DEFAULT_USERNAME
    elif prompt.startswith("Password"):
        path = os.environ.get("ENCLAVE_GIT_TOKEN_FILE", "")
        try:
            with open(path, encoding="utf-8") as handle:
                answer = handle.read().strip()
        except OSError:
            return 1
        if not answer:
            return 1
    else:
        return 1

    sys.stdout.write(answer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
