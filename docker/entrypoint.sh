#!/bin/sh
# The image's entrypoint: run one of the project's commands (default: digit-pipeline).
set -e
case "${1:-}" in
  ""|-h|--help|help)
    echo "usage: docker run IMAGE COMMAND [ARGS...]"
    echo "commands: digit-pipeline digit-data digit-train digit-sweep digit-evaluate digit-predict mlflow python"
    echo "each command's --help explains its options"; exit 0 ;;
  digit-*|mlflow|python|papermill) exec "$@" ;;
  *) echo "error: unknown command '$1' (expected digit-pipeline, digit-data, digit-train, digit-sweep, digit-evaluate, digit-predict, mlflow or python)" >&2; exit 2 ;;
esac
