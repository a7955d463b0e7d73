#!/usr/bin/env bash
# Run one phase, or the whole pipeline, in the image with `docker run`, against a local
# MinIO, the way a Job runs it in the cluster (non-root, read-only root filesystem,
# caches on volumes, S3 through AWS_* variables).
#
#   scripts/docker-run.sh pipeline                                 # the tiny demo, all phases, CPU image
#   scripts/docker-run.sh --gpus all --image gsm8k-posttrain:dev sft --preset abel-7b
#   scripts/docker-run.sh --gpus all --torchrun 8 --image gsm8k-posttrain:dev dpo --preset abel-7b
#   scripts/docker-run.sh --print sft --preset tiny                # show the docker commands only
#
# Options (before the command):
#   --image IMAGE     image to run (default: gsm8k-posttrain:cpu-dev, the CPU debug image)
#   --gpus SPEC       passed to `docker run --gpus` (all, 1, '"device=0,1"'); none by default
#   --torchrun N      start the command with torchrun across N processes (sft, dpo), through
#                     app/launch.py so a worker's exit code 2/3 is kept (torchrun alone exits 1)
#   --run-id ID       run id (default: debug); artifacts go to s3://gsm8k/debug/runs/<ID>/
#   --print           print the docker commands instead of running them
# Everything after the command is passed to `python -m app <command>`.
#
# MinIO runs as container gsm8k-minio on network gsm8k-debug, console on :9001, data in
# volume gsm8k-minio-data; `docker rm -f gsm8k-minio` stops it. Caches persist in the
# gsm8k-cache volume; set HF_CACHE=/path to mount a host Hugging Face cache instead.
set -euo pipefail

IMAGE=gsm8k-posttrain:cpu-dev
GPUS=""
TORCHRUN=""
RUN_ID=debug
PRINT=0
MINIO_IMAGE=quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z
NETWORK=gsm8k-debug
MINIO=gsm8k-minio
MINIO_USER=minio-local
MINIO_PASSWORD=minio-local-secret
BUCKET=gsm8k
STORE=s3://$BUCKET/debug

while [ $# -gt 0 ]; do
    case "$1" in
        --image) IMAGE=$2; shift 2 ;;
        --gpus) GPUS=$2; shift 2 ;;
        --torchrun) TORCHRUN=$2; shift 2 ;;
        --run-id) RUN_ID=$2; shift 2 ;;
        --print) PRINT=1; shift ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (options go before the command)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -lt 1 ]; then
    echo "usage: $0 [--image IMAGE] [--gpus SPEC] [--torchrun N] [--run-id ID] [--print] <command> [flags...]" >&2
    exit 2
fi
COMMAND=$1
shift

run() {
    if [ "$PRINT" = 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# --- the local S3: a MinIO container on a private network --------------------------------
if [ "$PRINT" = 1 ] || ! docker network inspect "$NETWORK" >/dev/null 2>&1; then
    run docker network create "$NETWORK"
fi
if [ "$PRINT" = 1 ] || [ -z "$(docker ps -q --filter "name=^${MINIO}$")" ]; then
    if [ "$PRINT" = 0 ]; then docker rm -f "$MINIO" >/dev/null 2>&1 || true; fi
    run docker run -d --name "$MINIO" --network "$NETWORK" -p 127.0.0.1:9000:9000 -p 127.0.0.1:9001:9001 \
        -e MINIO_ROOT_USER="$MINIO_USER" -e MINIO_ROOT_PASSWORD="$MINIO_PASSWORD" \
        -v gsm8k-minio-data:/data "$MINIO_IMAGE" server /data --console-address :9001
fi

S3_ENV=(-e AWS_ENDPOINT_URL="http://$MINIO:9000" -e AWS_ACCESS_KEY_ID="$MINIO_USER"
        -e AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD" -e AWS_REGION=us-east-1)

# Create the bucket from the image itself (boto3 is in it), retrying while MinIO starts.
run docker run --rm --network "$NETWORK" "${S3_ENV[@]}" --entrypoint python "$IMAGE" -c "
import time, boto3, botocore
s3 = boto3.client('s3')
for attempt in range(30):
    try:
        s3.create_bucket(Bucket='$BUCKET'); break
    except botocore.exceptions.ClientError as exc:
        if exc.response['Error']['Code'] in ('BucketAlreadyOwnedByYou', 'BucketAlreadyExists'): break
        raise
    except botocore.exceptions.EndpointConnectionError:
        time.sleep(1)
else:
    raise SystemExit('MinIO did not come up')
"

# --- the phase, as a pod runs it -----------------------------------------------------------
DOCKER_ARGS=(--rm --network "$NETWORK" --user 1000:1000 --read-only
             --tmpfs /tmp:rw,exec,size=8g --tmpfs /home/app:rw,size=1g
             --shm-size 16g --ulimit memlock=-1 --ulimit stack=67108864
             -v gsm8k-cache:/cache -v gsm8k-scratch:/scratch
             "${S3_ENV[@]}" -e PIPELINE_STORE="$STORE" -e PIPELINE_RUN_ID="$RUN_ID")
if [ -n "${HF_CACHE:-}" ]; then
    DOCKER_ARGS+=(-v "$HF_CACHE:/cache/huggingface")
fi
if [ -n "$GPUS" ]; then
    DOCKER_ARGS+=(--gpus "$GPUS")
fi
if [ -t 1 ]; then
    DOCKER_ARGS+=(-it)
fi
if [ -n "$TORCHRUN" ]; then
    run docker run "${DOCKER_ARGS[@]}" --entrypoint python "$IMAGE" \
        -m app.launch --nproc-per-node "$TORCHRUN" "$COMMAND" "$@"
else
    run docker run "${DOCKER_ARGS[@]}" "$IMAGE" "$COMMAND" "$@"
fi
