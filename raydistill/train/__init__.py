"""The train stage: the student learns from the teacher's corpus on Ray Train.

How a training run flows (``stage.run_train``, the driver): prepare the student
(``student.prepare_student``: the pruned baseline, built in a Ray task, or ``student.model``) →
check the inputs (LoRA targets, chat template, label source, logit-KD vocabulary: every refusal
before anything is deleted) → resume an interrupted run or start afresh → tokenize the corpus in
Ray Data and plan the steps (``examples``, ``plan``) → fit: Ray Train's ``TorchTrainer`` runs
``worker.train_loop_per_worker`` on every rank, which hands the work to ``loop.train_loop`` →
export: the final (or best) checkpoint's student is published as ``student/`` with the metrics,
the loss plot and ``train/summary.json``.

- ``stage``: the driver, its phases, the stage record and the resume key;
- ``student``: the student before training (pruned baseline or pretrained) and the checks that
  it can learn from this corpus (LoRA targets, ``VocabularyMismatch``);
- ``plan``: the step arithmetic (steps per epoch, warmup, checkpoint steps) and ``Plan``;
- ``worker``: the Ray Train worker function and the ``WorkerSettings`` it is handed;
- ``loop``: one worker's training loop, without Ray (optimizer steps, validation, checkpoints);
- ``losses``: sequence-KD and logit-KD losses (chunked, as sums over tokens);
- ``examples``: the corpus tokenized into training examples (Ray Data), their order and collation;
- ``prefetch``: the loop's background collation of the next micro-batches;
- ``parallel``: DDP / FSDP2 wrapping, full state dicts, the exported ``save_pretrained`` folder;
- ``checkpoints``: the checkpoint folders under ``train/ray/`` (find, read, prune, download);
- ``observe``: ``train/metrics.jsonl``, the loss plot and MLflow logging;
- ``smoke``: a Ray-free smoke check of the loop on one GPU or CPU (``python -m raydistill.train.smoke``).

Importing this package imports nothing heavy (torch, transformers, Ray, vLLM, pydantic): each
module imports what it needs, and ``loop``/``losses``/``parallel`` torch, when imported themselves.
"""
