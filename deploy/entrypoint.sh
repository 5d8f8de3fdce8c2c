#!/bin/sh
# One image, every service: the first argument chooses it.
#   router | attention | expert | kvstore   -> moemesh-<service> (remaining arguments are its flags)
#   moemesh                                 -> the CLI (moemesh up, status, generate, ...)
# Anything else is run as given (a shell for debugging, for example).
set -eu
if [ $# -eq 0 ]; then
  echo "usage: SERVICE [FLAGS...]  (SERVICE: router, attention, expert, kvstore or moemesh)" >&2
  exit 2
fi
service=$1
shift
case $service in
  router|attention|expert|kvstore) exec "/usr/local/bin/moemesh-$service" "$@" ;;
  moemesh|cli) exec /usr/local/bin/moemesh "$@" ;;
  *) exec "$service" "$@" ;;
esac
