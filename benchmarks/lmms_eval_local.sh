#!/usr/bin/env bash
# Run real lmms-eval on an adaptkit run or export, with a local VQA task (no hub), without installing
# lmms-eval's full dependency set into .venv: lmms-eval 0.7.3 and the few modules its evaluation path imports
# go into a throwaway --target folder put first on PYTHONPATH (filelock 3.x there: 0.7.3 needs filelock._api,
# which .venv's filelock 4 dropped). Prints lmms-eval's results and how many answers equal `adaptkit eval`'s.
# Usage: bash benchmarks/lmms_eval_local.sh RUN_OR_EXPORT VQA.jsonl [WORK_DIR]
set -euo pipefail
run=$(realpath "$1"); data=$(realpath "$2"); work=${3:-/tmp/adaptkit-lmms-eval}
mkdir -p "$work/task" "$work/target"
python -m pip install -q --disable-pip-version-check --no-deps --target "$work/target" lmms-eval==0.7.3 loguru \
  sacrebleu portalocker tabulate colorama lxml tenacity "filelock<4"
python - "$data" "$work/task" <<'PY'
import json, pathlib, sys
data, task = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with (task / "data.jsonl").open("w") as out:
    for line in data.read_text().splitlines():
        row = json.loads(line)
        image = pathlib.Path(row["image"])
        row["image"] = str(image if image.is_absolute() else data.parent / image)
        out.write(json.dumps(row) + "\n")
(task / "utils.py").write_text(
    "from PIL import Image\n\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
    "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n"
)
(task / "task.yaml").write_text(f"""task: adaptkit_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
PY
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$work/out"
# lmms-eval prints its table with pytablewriter, not installed here; the results file is written before that
PYTHONPATH="$work/target" python -m lmms_eval --model adaptkit --model_args "path=$run" --tasks adaptkit_local_vqa \
  --include_path "$work/task" --batch_size 16 --output_path "$work/out" --log_samples >"$work/log.txt" 2>&1 || true
adaptkit eval "$run" --data "$work/task/data.jsonl" --json >/dev/null
python - "$work/out" "$run" <<'PY'
import glob, json, sys
results = json.load(open(glob.glob(f"{sys.argv[1]}/*/*_results.json")[0]))["results"]["adaptkit_local_vqa"]
samples = sorted((json.loads(l) for l in open(glob.glob(f"{sys.argv[1]}/*/*_samples_*.jsonl")[0])), key=lambda r: r["doc_id"])
ours = [json.loads(l)["prediction"] for l in open(f"{sys.argv[2]}/eval_predictions.jsonl")]
same = sum(s["filtered_resps"] == o for s, o in zip(samples, ours))
print(json.dumps({"lmms_eval_exact_match": results["exact_match,none"], "questions": len(samples),
                  "answers_identical_to_adaptkit_eval": same}))
PY
