#!/usr/bin/env python3
# ubertool playbook: replay it with `ubertool replay THIS_FILE [-p NAME=VALUE ...]`, or run it directly.
# ubertool-playbook: {"credentials": [], "dumped": "2026-11-22T20:47:12+00:00", "format": 2, "mounts": ["shop (http /remote/shop)"], "name": "sales-report", "params": ["product"], "policy": "shop-policy.toml", "policy_sha256": "b3ec198b0436abc4bd728450860c793c63732a4a26d8e162b97317c719178bea", "recording": "sales-report.recording.json", "run": "20261122T204644-e19aec69", "ubertool": "ubertool"}
#
# sales-report: Sales of one product per region, from the shop API, written back as report.json
#
# Source: run 20261122T204644-e19aec69
# Policy: shop-policy.toml (sha256:b3ec198b0436abc4)
# Mounts: shop (http /remote/shop)
# Credentials: none
# Parameters: product (default 'tea')

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
product = 'tea'

# %% cell 1
import pandas as pd

sales = pd.read_csv('/remote/shop/sales.csv')

# %% cell 2 (not replayed: it only inspects)
# sales.head()

# %% cell 4
by_region = sales[sales['product'] == product].groupby('region')['total'].sum().sort_values(ascending=False)

# %% cell 5
import json

with open('/remote/shop/report.json', 'w') as f:
    json.dump({'product': product, 'by_region': by_region.to_dict()}, f)

# %% cell 6
print(by_region.to_string())
