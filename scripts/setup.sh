#!/usr/bin/env bash
# The project's install steps, in one place: `./dev setup` sources this file and calls its
# functions, and so does the job image's build (docker/Dockerfile), without the test and
# benchmark extras and with only the connector jar. Nothing is done twice: a venv is
# reinstalled only when setup.py, pyproject.toml or its lock file change, jars are fetched
# only when missing or wrong. Needs Python 3.11 ($PYTHON, else python3.11, else python3)
# and Maven (the jars).

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

log() { printf '[dev] %s\n' "$*" >&2; }

# A virtual environment beside the project's, for tools whose pins conflict with it;
# rebuilt only when its lock file changes.
side_venv() {
  local dir=$1 lock=$2 what=$3 want
  if [ ! -x "$dir/bin/python" ]; then
    log "creating virtual environment $dir ($what)"
    "$PY" -m venv "$dir"
  fi
  [ -f "$dir/.gitignore" ] || echo '*' > "$dir/.gitignore"
  want=$(sha256sum < "$lock" | cut -d' ' -f1)
  if [ "$(cat "$dir/.modelserving-stamp" 2>/dev/null)" != "$want" ]; then
    log "installing the pinned Python dependencies of $what ($lock)"
    "$dir/bin/pip" install --quiet --upgrade "pip>=24" setuptools wheel
    "$dir/bin/pip" install --quiet -r "$lock"
    echo "$want" > "$dir/.modelserving-stamp"
  fi
}

# The project's own environment: the project installed editable with the extras named
# (comma-separated, may be empty), every dependency pinned by requirements.lock.
project_venv() {
  local venv=$1 extras=$2 stamp want
  if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment $venv"
    "$PY" -m venv "$venv"
  fi
  stamp="$venv/.modelserving-stamp"
  want=$(cat setup.py pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing pinned Python dependencies (requirements.lock)"
    "$venv/bin/pip" install --quiet --upgrade "pip>=24" setuptools wheel
    "$venv/bin/pip" install --quiet -c requirements.lock -e ".${extras:+[$extras]}"
    echo "$want" > "$stamp"
  fi
}

# What the build produces beside the venv: the protobuf code and the pinned jars (of the
# groups named; all without any).
generated_files() {
  local venv=$1
  shift
  "$venv/bin/python" -m protos.build >/dev/null
  "$venv/bin/python" -m modelserving.local.jars fetch "$@"
}
