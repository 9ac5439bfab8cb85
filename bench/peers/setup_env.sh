#!/usr/bin/env bash
# Creates the peer benchmark's own virtual environment: PyTorch (CPU) and multivae 1.0.3.
# Not a dependency of bmvae-tf: nothing of the product imports torch.
#
#   bash bench/peers/setup_env.sh [VENV]        # default: bench/peers/.venv (gitignored)
#
# PyTorch's CPU wheel index is tried first; where that host cannot be reached, torch comes from
# the ordinary package index (its Linux wheel, CUDA libraries and all; it runs on CPU the same).
# multivae imports torchvision at module level; if no torchvision that matches the torch installed
# will import, bench/peers/stubs/ (a stub torchvision, put on the path by the benchmark worker)
# stands in for it: the benchmark uses none of torchvision.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip wheel

# A quick probe first: pip retries an unreachable host for minutes before it gives up.
if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=15)" \
        "$CPU_INDEX" 2>"$VENV/torch_cpu_index.log" \
   && "$PIP" install -q --retries 1 --timeout 30 --index-url "$CPU_INDEX" torch 2>>"$VENV/torch_cpu_index.log"; then
    torch_source="the CPU wheel index ($CPU_INDEX)"
else
    echo "setup_env: $CPU_INDEX cannot be reached (see $VENV/torch_cpu_index.log);" \
         "installing torch from the default index instead" >&2
    "$PIP" install -q torch
    torch_source="the default index ($CPU_INDEX unreachable)"
fi
# multivae without its dependencies first, then those it needs that torch did not bring; a
# torchvision that fails to install or import is replaced by the stub.
"$PIP" install -q --no-deps "multivae==1.0.3"
"$VENV/bin/python" - "$VENV" <<'PY' > "$VENV/multivae_requires.txt"
import sys
from importlib import metadata
skip = {"torch", "torchvision"}
for req in metadata.requires("multivae") or []:
    if "extra ==" in req:
        continue
    name = req.split(";")[0].strip()
    base = name.replace(">", " ").replace("<", " ").replace("=", " ").replace("~", " ").replace("!", " ").split()[0]
    if base.lower() not in skip:
        print(name)
PY
"$PIP" install -q -r "$VENV/multivae_requires.txt"

torchvision="stub (bench/peers/stubs)"
if "$PIP" install -q torchvision 2>"$VENV/torchvision.log" \
   && "$VENV/bin/python" -c "import torchvision" 2>>"$VENV/torchvision.log"; then
    torchvision="$("$VENV/bin/python" -c 'import torchvision; print(torchvision.__version__)')"
else
    echo "setup_env: torchvision does not install or import with this torch (see $VENV/torchvision.log);" \
         "the benchmark puts bench/peers/stubs on the path instead" >&2
    "$PIP" uninstall -q -y torchvision 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
echo "torch from: $torch_source; torchvision: $torchvision" | tee "$VENV/peers_env.txt"
