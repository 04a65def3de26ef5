# Source on the GPU machine: installs the carried wheels (.gpu-wheels) once and puts matvlm on the path.
# Idempotent: a later call on the same warm machine keeps /tmp/site (a background run may be importing from it).
set -e
# The shared gpu-wheels.sh builds transformers, mamba_ssm and liger; tokenizers and safetensors (binary, abi3)
# come from here: pip download --no-deps -d .gpu-wheels tokenizers==X safetensors==Y (this venv's versions).
for w in transformers tokenizers safetensors mamba_ssm liger_kernel; do
  ls .gpu-wheels/$w-*.whl >/dev/null 2>&1 || { echo "device_setup: .gpu-wheels/$w-*.whl is missing (see the comment above)"; exit 1; }
done
if [ ! -f /tmp/site/.installed ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/transformers-*.whl \
    .gpu-wheels/tokenizers-*.whl .gpu-wheels/safetensors-*.whl .gpu-wheels/mamba_ssm-*.whl \
    .gpu-wheels/liger_kernel-*.whl 2>&1 | grep -v WARNING || true
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, torch.cuda.get_device_name())"
