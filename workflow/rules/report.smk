# figure / table: one rule each, reading only the aggregated tables they show. Gathered by
# `snakemake --report`.


def run_outputs(run):
    out = [f"{R}/runs/{run}/metrics.parquet"]
    if run in ANALYSED:
        out.append(f"{R}/runs/{run}/spectrum.parquet")
        if project_config(CFG, run).enabled:
            out += [f"{R}/runs/{run}/{kind}.parquet" for kind in PROJECT_KINDS]
    return out


ALL_TARGETS = [path for run in RUNS for path in run_outputs(run)]
