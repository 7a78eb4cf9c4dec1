#!/bin/sh
# The container's command: report who and where it runs.
echo "app $(cat /etc/image-release) as $(id -un) on port ${APP_PORT}"
