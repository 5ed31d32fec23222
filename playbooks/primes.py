#!/usr/bin/env python3
# ubertool playbook: replay it with `ubertool replay THIS_FILE [-p NAME=VALUE ...]`, or run it directly.
# ubertool-playbook: {"credentials": [], "dumped": "2026-11-22T20:47:11+00:00", "format": 2, "mounts": [], "name": "primes", "params": ["limit"], "policy": null, "policy_sha256": "dc564476afcdfc73809f1da1ae828267a1d920ee359416c0fbd810374d34a9a0", "recording": "primes.recording.json", "run": "20261122T204643-bb2b1333", "ubertool": "ubertool"}
#
# primes: Count the primes up to a limit with a numpy sieve
#
# Source: run 20261122T204643-bb2b1333
# Policy: <embedded default policy> (sha256:dc564476afcdfc73)
# Mounts: none
# Credentials: none
# Parameters: limit (default 100)

if __name__ == "__main__":  # run directly: ubertool replays this file in the sandbox
    import os
    import shutil
    import sys

    _ubertool = shutil.which("ubertool") or 'ubertool'
    if not (os.path.isfile(_ubertool) and os.access(_ubertool, os.X_OK)):
        sys.exit("ubertool is not on PATH: activate the virtualenv it is installed in (. .venv/bin/activate), or run: PATH/TO/ubertool replay " + __file__)
    os.execv(_ubertool, [_ubertool, "replay", __file__, *sys.argv[1:]])
raise ImportError("an ubertool playbook: its cells run only in the sandbox, through `ubertool replay FILE`")

# %% parameters
limit = 100

# %% cell 1
import numpy as np

# %% cell 3
sieve = np.ones(limit + 1, dtype=bool)
sieve[:2] = False
for n in range(2, int(limit ** 0.5) + 1):
    if sieve[n]:
        sieve[n * n::n] = False

# %% cell 4
primes = np.flatnonzero(sieve)
primes[:10]

# %% cell 5
print(f'{len(primes)} primes up to {limit}; the largest is {primes[-1]}')
