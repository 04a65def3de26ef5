# On the GPU machine: a teacher run longer than one call. Call it three times back to back (the machine keeps
# runs/ while it stays warm, at most 30 minutes): each call trains ~9 minutes and resumes from the last
# checkpoint. Usage: bash scripts/device_teacher_long.sh CONFIG
set -o pipefail
bash scripts/device_teacher.sh "$1"
