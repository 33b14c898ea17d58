#!/bin/sh
# Makes MinIO ready for binloop, idempotently: the bucket, a policy allowing that bucket only,
# and binloop's own access key bound to it (services never get the root credentials).
#   setup.sh <endpoint> <bucket> <policy.json>
# Environment: MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, BINLOOP_S3_ACCESS_KEY, BINLOOP_S3_SECRET_KEY.
set -eu
endpoint="$1"
bucket="$2"
policy_file="$3"
export MC_CONFIG_DIR="${MC_CONFIG_DIR:-/tmp/mc}"

mc alias set binloop "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "binloop/$bucket"
mc admin policy create binloop binloop-rw "$policy_file"
mc admin user add binloop "$BINLOOP_S3_ACCESS_KEY" "$BINLOOP_S3_SECRET_KEY"
# attach fails when the policy is already attached, which is the state we want.
mc admin policy attach binloop binloop-rw --user "$BINLOOP_S3_ACCESS_KEY" \
    || mc admin user info binloop "$BINLOOP_S3_ACCESS_KEY" | grep -q binloop-rw
echo "bucket $bucket and user $BINLOOP_S3_ACCESS_KEY are ready"
