#!/bin/sh
# The image's entrypoint: a Python script or Python options run with the image's Python, anything
# else runs as given.
#   docker run IMAGE train.py --teacher ...               -> python train.py --teacher ...
#   docker run IMAGE -m tools.make_teacher --quick        -> python -m tools.make_teacher --quick
#   docker run IMAGE torchrun --nproc_per_node=8 train.py -> torchrun --nproc_per_node=8 train.py
#   docker run -it IMAGE bash                             -> a shell
set -e
case "${1:-}" in
    *.py | -*) exec python "$@" ;;
esac
exec "$@"
