#!/bin/sh
# The image's entrypoint: run one of the project's commands (default: digit-pipeline).
set -e
case "${1:-}" in
  ""|-h|--help|help)
    echo "usage: docker run IMAGE COMMAND [ARGS...]"
    echo "commands: digit-pipeline digit-data digit-train digit-sweep digit-evaluate digit-predict digit-serve" \
         "mlflow python"
    echo "each command's --help explains its options; 'healthcheck [PID]' is the image's HEALTHCHECK"; exit 0 ;;
  healthcheck)
    # The image's HEALTHCHECK: healthy unless process PID (default 1: what the container runs) is digit-serve and
    # its /health does not answer. Python's urllib, as the slim image has no curl.
    shift
    exec python - "${1:-1}" <<'EOF'
import os, sys, urllib.request
pid = sys.argv[1]
try: argv = open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace').split('\0')
except OSError: sys.exit(f"healthcheck: no process {pid}")
if not any(a.endswith('digit-serve') for a in argv): sys.exit(0)        # the pipeline, digit-predict...: no server
port = os.environ.get('DIGIT_SERVE_PORT') or '8000'
for a, b in zip(argv, argv[1:] + ['']):
    if a == '--port': port = b
    elif a.startswith('--port='): port = a.partition('=')[2]
url = f"http://127.0.0.1:{port}/health"
try: urllib.request.urlopen(url, timeout=4).read()
except Exception as e: sys.exit(f"healthcheck: {url}: {e}")
EOF
    ;;
  digit-*|mlflow|python|papermill) exec "$@" ;;
  *) echo "error: unknown command '$1' (expected digit-pipeline, digit-data, digit-train, digit-sweep," \
          "digit-evaluate, digit-predict, digit-serve, mlflow or python)" >&2; exit 2 ;;
esac
