#!/usr/bin/env bash
# Sets up everything loramesh needs, from a fresh clone, idempotently:
#   .venv/   the virtual environment with loramesh installed (editable) and its test tools
#   .tools/  non-Python tools from npm: anvil (devnet) and solc-js (contract compiler)
#   chromium + chromedriver (Debian packages) when called with --browser, for the browser tests,
#   and postgresql (Debian package; --browser or --postgres) for the multi-settler PostgreSQL tests
# Re-running is cheap: each step is skipped while its inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# torch is installed on its own first so that the right build is chosen: on machines that keep a
# CPU wheel on disk, this exact version takes it; elsewhere it is PyPI's default build.
# Override with e.g. LORAMESH_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
TORCH_SPEC="${LORAMESH_TORCH_SPEC:-torch==2.13.0}"
WANT_BROWSER=0
WANT_POSTGRES=0
for arg in "$@"; do
  case "$arg" in
    --browser) WANT_BROWSER=1; WANT_POSTGRES=1 ;;
    --postgres) WANT_POSTGRES=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup.sh: Python >= 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  say "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC
fi

stamp=.venv/.loramesh-installed
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing loramesh and its dependencies into .venv"
  "${PIP[@]}" install -e '.[test]'
  echo "$want" > "$stamp"
fi

# lorax-client, the official client tests/gateway/test_lorax_api.py holds LoRAX's API to, goes in on its own
# line with --no-deps: it pins certifi (==2024.7.4) and huggingface_hub (<1.0), neither of which it imports, and
# resolving those pins would move the packages transformers runs on. What it does import (aiohttp, pydantic, and
# requests, which it does not declare) the test extra installs already.
if ! .venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("lorax-client") != "0.6.3")' 2>/dev/null; then
  say "installing lorax-client 0.6.3 (without its dependencies) for the LoRAX API tests"
  "${PIP[@]}" install --no-deps lorax-client==0.6.3
fi

tools_stamp=.tools/.installed
tools_want="$(cat devnet/toolchain/package.json devnet/toolchain/package-lock.json | sha256sum | cut -d' ' -f1)"
if [ ! -f "$tools_stamp" ] || [ "$(cat "$tools_stamp")" != "$tools_want" ]; then
  if ! command -v npm >/dev/null; then
    echo "setup.sh: npm is needed to install anvil and solc-js (apt-get install nodejs npm)" >&2; exit 1
  fi
  say "installing anvil and solc-js from npm into .tools/"
  mkdir -p .tools
  cp devnet/toolchain/package.json devnet/toolchain/package-lock.json .tools/
  (cd .tools && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$tools_want" > "$tools_stamp"
fi

if [ "$WANT_BROWSER" = 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then
    say "installing chromium and chromium-driver (Debian packages) for the browser tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup.sh: the browser tests need chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi
if [ "$WANT_POSTGRES" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    say "installing postgresql (Debian package) for the PostgreSQL tests"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup.sh: the PostgreSQL tests need postgresql (sudo apt-get install postgresql); they skip without it" >&2
  fi
fi
say "ready"
