# Sourced by the scripts: create or reuse .venv and install the project with
# the extras named, once per change of pyproject.toml.
ensure_venv() {
    local extras="$1"
    local stamp=".venv/.installed-${extras}"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".[${extras}]"
        touch "$stamp"
    fi
}
