#!/usr/bin/env bash
# The tests that touch transformers at both ends of what pyproject allows (CI runs this after the
# locked suite), each end in its own venv:
#   oldest: requirements/lock-oldest.txt, the lock with transformers at its oldest supported release;
#   newest: pyproject's ranges resolved today (LOCK=none), which picks up any release newer than the
#           lock (transformers, accelerate, peft, ...); skipped when it resolves to the lock itself.
#   bash scripts/test_transformers_range.sh [oldest] [newest]      (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
# Everything but the video-decoding and synthetic-data tests, which do not import transformers.
TESTS=(tests --ignore=tests/test_video.py --ignore=tests/test_synthetic.py)
normalise() { grep -E '^[A-Za-z0-9_.-]+==' | grep -vE '^(torch|torchvision|pip|setuptools|wheel)==' | tr 'A-Z_' 'a-z-' | sort; }

ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(oldest newest)
for end in "${ends[@]}"; do
  venv=".venv-$end"
  case $end in
    oldest) VENV=$venv LOCK=requirements/lock-oldest.txt bash scripts/setup.sh ;;
    newest)
      VENV=$venv LOCK=none bash scripts/setup.sh
      newer=$(comm -13 <(normalise < requirements/lock.txt) <("$venv/bin/python" -m pip freeze | normalise))
      if [ -z "$newer" ]; then
        echo "newest: pyproject's ranges resolve to requirements/lock.txt today; the locked suite covered it"
        continue
      fi
      echo "newest: releases newer than the lock:" $newer ;;
    *) echo "test_transformers_range.sh: unknown end '$end' (oldest | newest)" >&2; exit 2 ;;
  esac
  echo "== $end: transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
  "$venv/bin/python" -m pytest -q --durations=12 "${TESTS[@]}"
done
