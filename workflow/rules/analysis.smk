# analyse: per run, one job (resources.chains_per_job: 0) or several, each running warm-start chains
# (spectrum.warm_chain consecutive checkpoints) in step order: the spectrum of each checkpoint,
# warm-started from the one before in its chain, then every registered analysis (sharpflow/analyses)
# selected at that checkpoint, in the same process. Every checkpoint keeps its own output files; a
# killed or rerun job reuses what it already computed (the run's analysis stash). A job that covers
# the whole run also writes its aggregated tables; otherwise an aggregate job per run does. With
# resources.runs_per_job > 1, whole runs of a study are analysed one after another in one job.
#
# resources.spectrum.world_size N > 1: each analysis job is N processes under resources.spectrum.launcher
# (torchrun --standalone, or srun for one SLURM task per rank), asking for N times the threads, GPUs and
# memory (analyse_launch in common.smk); only the spectrum, density, ggn and batch_sharpness run, with
# runs_per_job 1 (checked when the workflow is read). N 1 keeps exactly the command and resources it
# always had.
#
# These rules are generated per run (analyse_<run>, analyse_<run>_j<i>, aggregate_<run>) and per group
# (analyse_<study>__group<i>): a job's outputs are its runs' aggregated tables, one per table kind its runs
# have, which depends on the analyses planned for each run (an analysis on for some studies or runs only,
# best.pt's spectrum), or, for a split run, its chains' per-checkpoint files. Outputs cannot be functions,
# so no single wildcard rule can declare them.

GROUPED = {run for runs in GROUPS.values() if len(runs) > 1 for run in runs}

for _run in ANALYSED:
    if _run in GROUPED:
        continue
    for _i, _job in enumerate(JOBS[_run]):
        _command, _threads, _resources = analyse_launch(job_resources(_run, _job))

        rule:
            name:
                job_name(_run, _i)
            input:
                checkpoints=[ckpt_path(_run, s) for s in job_steps(_job)],
                best=best_input(_run, _job),
                data=data_files(RUNS[_run].dataset),
            output:
                job_outputs(_run, _job),
            params:
                spectrum=SPEC_JSON[_run],
                analyses=job_plan_json(_run, _job),
                run=RUN_JSON[_run],
                name=_run,
                starts=" ".join(str(chain[0]) for chain in _job),
                aggregate="--aggregate" if _run not in SPLIT else "",
                best=lambda w, input: f"--best {shlex.quote(input.best[0])}" if input.best else "",
                data=lambda w, input: parent(input.data[0]),
                results=results_root(3 if _run not in SPLIT else 4),
                timing=f"{R}/benchmarks/analyse/{_run}/job{_i:03d}.json",
                version=analyse_version([_run]),
            conda:
                ENV
            log:
                f"{R}/logs/analyse/{_run}/job{_i:03d}.log",
            benchmark:
                f"{R}/benchmarks/analyse/{_run}/job{_i:03d}.tsv"
            threads: _threads
            priority: ANALYSIS_PRIORITY + analysis_weight(_run)
            resources:
                **_resources,
            shell:
                f"{_command}--no-progress --threads {{threads}} --spectrum {{params.spectrum:q}} "
                "--analyses {params.analyses:q} --run {params.run:q} --run-name {params.name:q} "
                "--data {params.data:q} --results {params.results:q} --chain-starts {params.starts} "
                "{params.aggregate} {params.best} --timing {params.timing:q} {input.checkpoints:q} 2> {log:q}"


# resources.runs_per_job > 1: several whole runs of a study, one after another in one process.
for _group, _runs in GROUPS.items():
    if len(_runs) < 2:
        continue
    _res = group_resources(_runs)

    rule:
        name:
            rule_name("analyse", _group)
        input:
            checkpoints=[ckpt_path(r, s) for r in _runs for s in job_steps(JOBS[r][0])],
            best=[best_path(r) for r in _runs if r in BEST],
            data=sorted({f for r in _runs for f in data_files(RUNS[r].dataset)}),
        output:
            [path for r in _runs for path in aggregated(r)],
        params:
            runs=dump_json_dict([group_entry(r) for r in _runs]),
            results=results_root(3),
            timing=f"{R}/benchmarks/analyse/{_group}/job000.json",
            version=analyse_version(_runs),
        conda:
            ENV
        log:
            f"{R}/logs/analyse/{_group}/job000.log",
        benchmark:
            f"{R}/benchmarks/analyse/{_group}/job000.tsv"
        threads: _res["threads"]
        priority: ANALYSIS_PRIORITY + sum(analysis_weight(r) for r in _runs)
        resources:
            **{k: v for k, v in _res.items() if k != "threads"},
        shell:
            "sharpflow analyse-runs --no-progress --threads {threads} --runs {params.runs:q} "
            "--results {params.results:q} --timing {params.timing:q} 2> {log:q}"


for _run in SPLIT:

    rule:
        name:
            rule_name("aggregate", _run)
        input:
            [path for kind in TABLE_KINDS if (_run, kind) in TABLE_STEPS for path in per_checkpoint(_run, kind)],
        output:
            aggregated(_run),
        params:
            out=lambda w, output: parent(output[0]),
            timing=f"{R}/benchmarks/aggregate/{_run}.json",
        conda:
            ENV
        log:
            f"{R}/logs/aggregate/{_run}.log",
        benchmark:
            f"{R}/benchmarks/aggregate/{_run}.tsv"
        localrule: True
        shell:
            "sharpflow aggregate --out-dir {params.out:q} --timing {params.timing:q} {input:q} 2> {log:q}"
