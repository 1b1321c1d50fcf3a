#!/bin/sh
# The image's entrypoint (under tini): `onetoken "$@"`, after turning every
# ONETOKEN_<NAME>_FILE=/path into ONETOKEN_<NAME>=<the file's content>, the convention of
# the official database images. Secrets then come from mounted files (compose secrets,
# Kubernetes Secret volumes) and never appear in the compose file or `inspect` output.
set -eu
for name in $(env | sed -n 's/^\(ONETOKEN_[A-Z0-9_]*\)_FILE=.*$/\1/p'); do
  path="$(printenv "${name}_FILE")"
  if [ ! -r "$path" ]; then
    echo "onetoken: error: ${name}_FILE names $path, which cannot be read" >&2
    exit 2
  fi
  # $(...) drops the trailing newline an editor leaves in a secret file.
  value="$(cat "$path")"
  export "${name}=${value}"
  unset "${name}_FILE"
done
exec onetoken "$@"
