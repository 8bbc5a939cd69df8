"""The sandbox image's recipe and the programs that run inside a sandbox.

`clone_step.py` and `git_askpass.py` run on the sandbox image's own Python
(standard library only), not in the control plane: a backend mounts this
directory read-only into the clone step and runs `CLONE_STEP` there. Importing
`enclave.sandbox.clone_step` on the host gives its exit codes and messages.
"""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
CLONE_STEP = DIRECTORY / "clone_step.py"
GIT_ASKPASS = DIRECTORY / "git_askpass.py"
