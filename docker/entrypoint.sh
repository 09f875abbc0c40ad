#!/bin/sh
# The image's entrypoint: one image, the role is the command.
#
#   docker run cohort superlink --certs ...    ->  cohort superlink --certs ...
#   docker run cohort cohort supernode ...     ->  cohort supernode ...
#   docker run cohort flwr run /app ...        ->  flwr run /app ...
#   docker run cohort flower-superexec ...     ->  flower-superexec ...
#   docker run cohort sh -c '...'              ->  sh -c '...'
#
# Every branch execs, so the program started is the container's main process (under
# compose's `init: true`, the child of tini) and receives stop signals itself; `cohort
# superlink` and `cohort supernode` exec Flower in turn.
set -eu

if [ "$#" -eq 0 ]; then
    exec cohort --help
fi

case "$1" in
    cohort | flwr | flwr-* | flower-* | python | python3 | sh | bash)
        exec "$@"
        ;;
    *)
        exec cohort "$@"
        ;;
esac
