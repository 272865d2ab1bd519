#!/bin/sh
# Wheels that bench/gpu_check.py needs on a lent GPU machine beyond what its image holds (its transformers is
# older, and it has no pydantic): the versions of this checkout's .venv, for the image's Python 3.12, into .whl/
# (ignored by git, carried by the device tool's `carry: [".whl"]`). About 16 MB.
set -e
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
ls -l .whl
