#!/bin/sh
# The install steps of the image, shared by the Dockerfile and scripts/dockerfile_smoke.sh so the
# smoke test runs exactly what the image runs. Needs VENV (the venv to create and fill).
#
#   install.sh torch         create $VENV and install torch (TORCH_VERSION, from TORCH_INDEX_URL if set)
#   install.sh app SRC_DIR   install kvserve from a source tree into $VENV
#   install.sh model         fetch the default model into $KVSERVE_HOME (skipped when FETCH_MODEL=0)
set -eu

: "${VENV:?set VENV to the venv directory}"
step="${1:?usage: install.sh torch|app SRC_DIR|model}"

case "$step" in
  torch)
    python3 -m venv "$VENV"
    # The CPU index keeps the image small; an empty TORCH_INDEX_URL means the default index.
    "$VENV/bin/pip" install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      "torch==${TORCH_VERSION:-2.13.0}"
    ;;
  app)
    "$VENV/bin/pip" install --no-cache-dir "${2:?usage: install.sh app SRC_DIR}"
    ;;
  model)
    mkdir -p "${KVSERVE_HOME:?set KVSERVE_HOME}"
    if [ "${FETCH_MODEL:-1}" = "1" ]; then
      "$VENV/bin/kvserve" pull "${KVSERVE_MODEL:-smollm2-135m}"
    fi
    ;;
  *)
    echo "install.sh: unknown step $step" >&2
    exit 2
    ;;
esac
