#!/usr/bin/env bash
# The GPU check's one command (`make gpu-check`, docs/gpu.md), for a CUDA machine with torch and Triton
# preinstalled and no package registry: fastvae installs without its dependencies, pydantic comes from the
# wheels in .whl/ (`make gpu-wheels`, where pip reaches PyPI), Fashion-MNIST from the folder $FASTVAE_DATA_DIR.
# Needs only bash: `bash bench/gpu_check.sh` runs it where make is missing. DEVICE=cpu runs its CPU mode.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${GPU_CHECK_PYTHON:-python3}
site=  # where pydantic's wheels go, only where the Python lacks it
if ! "$python" -c "import pydantic" 2>/dev/null; then
  site=/tmp/fastvae-site
  wheels=(.whl/*.whl)
  if [[ ! -e ${wheels[0]} ]]; then
    echo "gpu-check: pydantic is not installed and .whl/ holds no wheels: run 'make gpu-wheels' where pip" \
      "reaches PyPI, and bring .whl/ along" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}"
fi
# Editable: the package maps fastvae.kernels and fastvae.export to kernels/ and export/ in this tree.
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
if [[ -n $site ]]; then
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
PYTHONUNBUFFERED=1 exec "$python" -m bench.gpu_check --device "${DEVICE:-cuda}" "$@"
