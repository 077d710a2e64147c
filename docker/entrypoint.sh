#!/bin/sh
# The image's entrypoint: run one of the project's commands (default: digit-pipeline).
set -e
FOLDERS="/app/data /app/dataset_cleaned /app/training_results /app/runs /app/feedback"
RUNTIME_USER=digits

run() {
  # Run "$@" as the runtime user. Started as root (the default), first give it the folders mounted from the host
  # (docker makes a missing host folder as root; what is already the user's is not touched; a read-only mount is left
  # as it is), then drop root for good with setpriv, as the postgres image does with gosu. Started as another user
  # (`docker run --user UID:GID`), check that it can write the folders: one line naming any it cannot.
  if [ "$(id -u)" = 0 ] && id "$RUNTIME_USER" >/dev/null 2>&1; then
    for d in $FOLDERS; do
      [ -d "$d" ] && find "$d" \! -user "$RUNTIME_USER" -exec chown "$RUNTIME_USER:$RUNTIME_USER" '{}' + 2>/dev/null || true
    done
    export HOME="/home/$RUNTIME_USER" USER="$RUNTIME_USER"
    exec setpriv --reuid="$RUNTIME_USER" --regid="$RUNTIME_USER" --init-groups -- "$@"
  fi
  for d in $FOLDERS; do
    if [ -d "$d" ] && ! [ -w "$d" ]; then
      echo "error: $d is not writable by uid $(id -u) (mount a folder that user owns, or run without --user:" \
           "the entrypoint then gives the mounted folders to uid 1000)" >&2
      exit 1
    fi
  done
  [ -w "${HOME:-/}" ] || export HOME=/tmp        # an arbitrary uid has no home: caches go to /tmp
  exec "$@"
}
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
  digit-*|mlflow|python|papermill) run "$@" ;;
  *) echo "error: unknown command '$1' (expected digit-pipeline, digit-data, digit-train, digit-sweep," \
          "digit-evaluate, digit-predict, digit-serve, mlflow or python)" >&2; exit 2 ;;
esac
