# train: one rule per run, train_<run> (rule_name). Its outputs are the run's metrics and every checkpoint of
# its schedule, known up front and declared one by one: analysis jobs take exactly their chain's checkpoints,
# and prune_checkpoints marks the intermediate ones temp(). The schedule differs between runs in length and
# steps, and a rule's outputs can be neither a function nor files without all of its wildcards, so one
# wildcard rule could declare them only as a directory() or through a dynamic `checkpoint`, losing both.

# A run with world_size > 1 is trained by that many processes: the command gets the launcher's prefix (torchrun
# --standalone on one machine, srun for one SLURM task per rank: resources.train.launcher), the job asks for
# world_size times the threads (and GPUs), and, under srun, for world_size tasks (train_launch in common.smk).
# A run of one process keeps exactly the command, params and resources it always had.

for _run, _rc in RUNS.items():
    _launch = train_launch(_run)

    rule:
        name:
            rule_name("train", _run)
        input:
            data_files(_rc.dataset),
        output:
            # metrics first: what other rules ask for is then matched without scanning the checkpoints
            metrics=f"{R}/runs/{_run}/metrics.parquet",
            checkpoints=train_outputs(_run),
        params:
            run=dump_json(_rc),
            dataset=dump_json(CFG.datasets[_rc.dataset]),
            name=_run,
            data=lambda w, input: parent(input[0]),
            out=lambda w, output: parent(output.metrics),
            version=FORMAT_VERSION["train"],
        conda:
            ENV
        log:
            f"{R}/logs/train/{_run}.log",
        benchmark:
            f"{R}/benchmarks/train/{_run}.tsv"
        threads: _launch.threads
        priority: train_priority(_run)
        resources:
            gpu=_launch.gpu,
            gpu_model=RES.train.gpu_model,
            mem_mb=_launch.mem_mb,
            runtime=RES.train.runtime,
            **_launch.resources,
        shell:
            f"{_launch.prefix}sharpflow train --no-progress --threads {{threads}} --run {{params.run:q}} "
            "--run-name {params.name:q} --dataset {params.dataset:q} --data {params.data:q} "
            "--out {params.out:q} --timing {params.out:q}/../../benchmarks/train/{params.name}.json 2> {log:q}"
