"""Multi-process launch of stage 05's training: build the torchrun / accelerate command, run it, stream its log.

A notebook never holds a multi-GPU job inside its kernel: it calls `launch.run(...)`, which starts

    torchrun --nproc_per_node N -m fgaif_utils.launch --params P --run-name R --out DIR ...
    accelerate launch --num_processes N -m fgaif_utils.launch ...

and then reads the artifacts the job wrote into DIR (rank 0 writes them). Each rank runs `ppo.run_job`
unchanged: the process group is set up here (NCCL on GPUs, gloo on CPU) from the environment the launcher
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

DeepSpeed: with `ppo.deepspeed` naming a DeepSpeed config (params/deepspeed/zero3.json) the same ranks wrap the
policy and the value model in DeepSpeed engines (`ppo.use_deepspeed`). ZeRO stage 3 partitions what is large here,
the frozen bases every rank would otherwise hold whole (LLaVA-1.5-7B policy + 13B reward base: about 40 GB in
bf16), over the ranks; each decode step then gathers every layer's weights from the other ranks, the price of it.
The launchers stay torchrun / accelerate (no `deepspeed` launcher needed: the process group comes from them).
`models.load_in_4bit` (NF4: about 11 GB for both bases) is the other memory answer; the two do not combine.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path


class LaunchError(RuntimeError):
    """The multi-process job failed; the message holds the end of its log."""


def free_port():
    """A TCP port no process on this host listens on now (the OS picks it), for the ranks' rendezvous: a fixed one
    fails when two jobs share a host or a dead job's rank still holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(launcher, nproc, params_path, run, data_dir, models_dir, reward_dir, out_dir, checkpoint_dir,
            master_port=None):
    """The argv that starts `nproc` ranks of the stage-05 job (one GPU a rank where there are GPUs), meeting on
    `master_port` (None: a free one)."""
    import torch
    master_port = master_port or free_port()
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"{params_path}: key 'ppo.nproc' is {nproc}, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s) and each rank takes one: set ppo.nproc to at "
                         f"most {torch.cuda.device_count()}")
    job = ["-m", "fgaif_utils.launch", "--params", str(params_path), "--run-name", run, "--data-dir", str(data_dir),
           "--models-dir", str(models_dir), "--reward-dir", str(reward_dir), "--out", str(out_dir),
           "--checkpoint-dir", str(checkpoint_dir)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(master_port), *job]
    if launcher == "accelerate":
        accelerate = shutil.which("accelerate") or "accelerate"
        extra = ["--multi_gpu"] if nproc > 1 else []
        return [accelerate, "launch", "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port",
                str(master_port), "--mixed_precision", "no", "--dynamo_backend", "no", *extra, *job]
    raise ValueError(f"launcher {launcher!r}: use 'torchrun' or 'accelerate' (or 'none' to train in the kernel)")


# How long a rank waits in a collective for the others (NCCL's default is 10 minutes): rank 0's validation runs alone.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
FINISHED = "ranks_finished"   # rank 0 writes it into the job's --out folder once every rank has done its work


def run(argv, log_path, cwd=None, env=None, finished=None):
    """Run the job, echoing its output live and writing it to `log_path`; LaunchError with the log's tail on
    failure. `finished`: the marker the ranks write when all of them are done (`FINISHED` in the job's --out);
    a rank that fails after it appeared (in teardown) is reported as a warning, not as a failed job."""
    log_path = Path(log_path)
    if finished is not None:
        Path(finished).unlink(missing_ok=True)     # a marker left by an earlier run proves nothing about this one
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                   env={**os.environ, **(env or {})})
        for line in process.stdout:
            log.write(line)
            log.flush()
            print(line, end="", flush=True)
        code = process.wait()
    return settle(code, finished, log_path, " ".join(argv[:6]) + " ...")


def settle(code, finished, log_path, job="the job"):
    """The job's exit status judged: 0 passes; a failure after every rank finished (the marker `finished` exists)
    is a crash in teardown that lost nothing, so a warning (on CPU, gloo has aborted a rank at exit twice in the
    suite's history, and in none of 55 reruns of the 2-rank update test here); any other failure raises
    LaunchError with the end of the log."""
    log_path = Path(log_path)
    if code == 0:
        return 0
    if finished is not None and Path(finished).exists():
        warning = (f"WARNING: {job} exited with status {code} after every rank had finished its work (a crash "
                   f"while the ranks shut down); its outputs are complete. Log: {log_path}")
        with open(log_path, "a") as log:
            log.write(warning + "\n")
        print(warning, flush=True)
        return code
    tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
    raise LaunchError(f"{job} exited with status {code}; log {log_path}:\n{tail}")


def all_ranks_finished(marker):
    """Call on every rank once its work is done: wait for all ranks (so no rank tears the process group down
    while another still talks to it), then rank 0 writes `marker`."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        if dist.get_rank() != 0:
            return
    Path(marker).write_text("every rank finished its work\n")


def init_distributed():
    """Join the process group the launcher describes in the environment; (rank, world size)."""
    import torch
    import torch.distributed as dist
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Ranks wait at a barrier while rank 0 alone validates (greedy descriptions of the validation images, then
        # scoring): at LLaVA-1.5's 512 new tokens that can near NCCL's default 10-minute watchdog, which kills the job.
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return (dist.get_rank(), world_size) if dist.is_initialized() else (0, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fgaif_utils.launch", description="one rank of the stage-05 job")
    for name in ("--params", "--run-name", "--data-dir", "--models-dir", "--reward-dir", "--out", "--checkpoint-dir"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist
    from . import params as P
    from . import ppo
    settings = P.load(P.resolve_params_path(args.params))
    torch.set_num_threads(max(1, settings.num_threads // int(os.environ.get("WORLD_SIZE", "1"))))
    rank, _ = init_distributed()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        ppo.run_job(settings, args.data_dir, args.models_dir, args.reward_dir, args.out, args.checkpoint_dir)
        all_ranks_finished(Path(args.out) / FINISHED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
