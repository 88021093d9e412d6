# train: one rule per run, train_<run> (rule_name). Its outputs are the run's metrics and every checkpoint of
# its schedule, known up front and declared one by one: analysis jobs take exactly their chain's checkpoints,
# and prune_checkpoints marks the intermediate ones temp(). The schedule differs between runs in length and
# steps, and a rule's outputs can be neither a function nor files without all of its wildcards, so one
# wildcard rule could declare them only as a directory() or through a dynamic `checkpoint`, losing both.

for _run, _rc in RUNS.items():

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
        threads: RES.train.threads
        priority: train_priority(_run)
        resources:
            gpu=RES.train.gpu,
            gpu_model=RES.train.gpu_model,
            mem_mb=RES.train.mem_mb,
            runtime=RES.train.runtime,
        shell:
            "sharpflow train --no-progress --threads {threads} --run {params.run:q} "
            "--run-name {params.name:q} --dataset {params.dataset:q} --data {params.data:q} "
            "--out {params.out:q} --timing {params.out:q}/../../benchmarks/train/{params.name}.json 2> {log:q}"
