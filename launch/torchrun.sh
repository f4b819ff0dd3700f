#!/usr/bin/env bash
# Start conadv-train under torchrun: one node, or this node of a multi-node job.
#
#   one node, 8 GPUs:
#     launch/torchrun.sh --nproc-per-node 8 -- --config configs/imagenet/resnet50_96k.yaml \
#         data.root=/data/imagenet log.run_dir=/shared/runs/r50_96k
#   many nodes, c10d rendezvous (run the same line on every node):
#     launch/torchrun.sh --nnodes 8 --nproc-per-node 8 --rdzv-endpoint node01:29500 \
#         --rdzv-id r50_96k -- --config ...
#   many nodes, static ranks:
#     launch/torchrun.sh --nnodes 2 --node-rank 0 --master-addr node01 --nproc-per-node 8 -- ...
#   elastic node count: --nnodes 6:8 with --rdzv-endpoint (resume adapts the accumulation)
#   elastic restarts: add --max-restarts 3; restarted workers resume from the newest valid
#   checkpoint (checkpoint.resume=auto is the default).
#
# Everything after -- goes to conadv-train. PYTHON selects the interpreter (default python3).
set -euo pipefail

usage() { sed -n '2,18p' "$0" >&2; exit 2; }

nproc=1
nnodes=1
node_rank=""
master_addr=""
master_port=29500
rdzv_endpoint=""
rdzv_id="${SLURM_JOB_ID:-conadv}"
max_restarts=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master-addr) master_addr=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    --rdzv-endpoint) rdzv_endpoint=$2; shift 2 ;;
    --rdzv-id) rdzv_id=$2; shift 2 ;;
    --max-restarts) max_restarts=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "torchrun.sh: unknown option '$1'; the conadv-train arguments go after --" >&2
       exit 2 ;;
  esac
done

args=(--nproc-per-node "$nproc" --max-restarts "$max_restarts")
if [ -n "$rdzv_endpoint" ]; then
  args+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint"
         --rdzv-id "$rdzv_id")
elif [[ "$nnodes" == *:* ]]; then
  echo "torchrun.sh: an elastic --nnodes $nnodes needs --rdzv-endpoint (a c10d rendezvous)" >&2
  exit 2
elif [ "$nnodes" -gt 1 ]; then
  if [ -z "$node_rank" ] || [ -z "$master_addr" ]; then
    echo "torchrun.sh: --nnodes $nnodes needs --rdzv-endpoint, or --node-rank and" \
         "--master-addr" >&2
    exit 2
  fi
  args+=(--nnodes "$nnodes" --node-rank "$node_rank" --master-addr "$master_addr"
         --master-port "$master_port")
else
  args+=(--standalone)
fi
exec "${PYTHON:-python3}" -m conadv.cli.launch "${args[@]}" -m conadv.cli.train "$@"
