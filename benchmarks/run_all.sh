#!/usr/bin/env bash
# Every benchmark once, on whatever device JAX finds (CPU, or a GPU with jax[cuda]).
#     bash benchmarks/run_all.sh [--small]
# --small shrinks the WRN step to a CPU-sized batch.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import jax; print('devices:', jax.devices())"
python step_time.py
python memory.py
for model in cnn big-mlp mlp; do python msharpness.py --model "$model"; done
python cpu_dispatch.py
python efficient.py
for model in cnn big-mlp; do python sampa.py --model "$model"; python jit_msharpness.py --model "$model"; done
python sharded_memory.py
python language_model.py
python hessian.py
if [ "${1:-}" = "--small" ]; then python wrn.py --batch 8 --repeats 3; else python wrn.py; fi
