# Two commands do everything on a fresh machine:
#   make run    create .venv, then run the whole pipeline on the embedded default (params/tiny.yaml)
#   make test   create .venv, then run the test suite (includes every stage end to end on params/smoke.yaml)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/tiny.yaml
STAGES ?=

.PHONY: setup run ablations seeds grounded-seeds batch-seeds words-seeds oracle-seeds long-seeds long-oracle-seeds policyqa-seeds test smoke lab

# $(call pooled,RUN,SPLITS,GROUPS AND PAIRS): the seed-pooled comparison of RUN's stage 06 records on each split
# (evaluate.seed_pooled_tests; images and seeds resampled). A comma inside an argument is written $(comma).
comma := ,
pooled = for split in $(2); do $(PY) -m fgaif_utils.evaluate outputs/$(1)/06_evaluate/records.jsonl --split $$split $(3) || exit 1; done

# $(call seeds3,GROUP,SEED0,PREFIX): the pooled comparison's group of one policy at PPO seeds 0-2,
# --group GROUP=SEED0,PREFIX-s1,PREFIX-s2.
seeds3 = --group $(1)=$(2)$(comma)$(3)-s1$(comma)$(3)-s2

# $(call stage05,DIR,RUNS): stage 05 of params/DIR/RUN.yaml for each RUN, stopping at the first failure.
stage05 = for r in $(2); do $(PY) -m fgaif_utils.pipeline params/$(1)/$$r.yaml --stages 05 || exit 1; done

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'fgaif.pth').write_text(str(pathlib.Path('.').resolve()) + '\n')"
	touch $@

setup: $(VENV)/.installed

# The default run: every stage of the embedded default, plus the sparse-reward ablation's PPO (stage 05 of run
# tiny-sparse, reusing tiny's stages 00-04) before stage 06, which compares base, FGAIF and the ablations present.
run: setup
ifeq ($(PARAMS)$(STAGES),params/tiny.yaml)
	$(PY) -m fgaif_utils.pipeline params/tiny.yaml --stages 00-05
	$(PY) -m fgaif_utils.pipeline params/ablations/sparse.yaml --stages 05
	$(PY) -m fgaif_utils.pipeline params/tiny.yaml --stages 06
else
	$(PY) -m fgaif_utils.pipeline $(PARAMS) $(if $(STAGES),--stages $(STAGES),)
endif

# Every ablation of params/ablations/ (stage 05 each; holistic also retrains stage 04), then tiny's stage 06 again
# (the policies it evaluated before are read back from its cache).
ablations: setup
	for f in params/ablations/*.yaml; do $(PY) -m fgaif_utils.pipeline $$f --stages 04-05 || exit 1; done
	$(PY) -m fgaif_utils.pipeline params/tiny.yaml --stages 06 --force

# PPO seeds 1 and 2 of FGAIF and of the sparse ablation (after `make run`), stage 06 over all six policies and the
# base, then the seed-pooled comparison (images and seeds resampled).
SEED_RUNS := tiny-s1 tiny-sparse-s1 tiny-s2 tiny-sparse-s2
seeds: setup
	$(call stage05,seeds,$(SEED_RUNS))
	$(PY) -m fgaif_utils.pipeline params/seeds/tiny-seeds.yaml --stages 06
	$(call pooled,tiny-seeds,eval eval_ood,--group base=base $(call seeds3,fgaif,fgaif,tiny) \
	  $(call seeds3,sparse,tiny-sparse,tiny-sparse) --pair fgaif:base --pair fgaif:sparse)

# The same over params/grounded/ (after the steps in params/grounded/naming.yaml's header): the grounded-naming run's
# sparse ablation and PPO seeds 1 and 2 of both, stage 06 over all six policies, the seed-pooled comparison.
GROUNDED_RUNS := sparse s1 sparse-s1 s2 sparse-s2
grounded-seeds: setup
	$(call stage05,grounded,$(GROUNDED_RUNS))
	$(PY) -m fgaif_utils.pipeline params/grounded/seeds.yaml --stages 06
	$(call pooled,tiny-grounded-seeds,eval eval_long eval_ood,--group base=base \
	  $(call seeds3,fgaif,fgaif,tiny-grounded) \
	  $(call seeds3,sparse,tiny-grounded-sparse,tiny-grounded-sparse) \
	  --pair fgaif:base --pair fgaif:sparse)

# The paper's rollout batch (256 responses per iteration, minibatches of 128: tiny's number of gradient steps) over
# params/batch/, after `make run`: FGAIF and sparse at PPO seeds 0-2, tiny's FGAIF seeds 1-2 where `make seeds` has
# not trained them, stage 06 over all nine policies and the base, then the seed-pooled comparison.
BATCH_RUNS := fgaif sparse s1 sparse-s1 s2 sparse-s2
batch-seeds: setup
	$(call stage05,seeds,tiny-s1 tiny-s2)
	$(call stage05,batch,$(BATCH_RUNS))
	$(PY) -m fgaif_utils.pipeline params/batch/seeds.yaml --stages 06
	$(call pooled,tiny-b256-seeds,eval eval_long eval_ood,--group base=base $(call seeds3,b256,fgaif,tiny-b256) \
	  $(call seeds3,b256sparse,tiny-b256-sparse,tiny-b256-sparse) \
	  $(call seeds3,tiny,tiny,tiny) --pair b256:base --pair b256:b256sparse --pair b256:tiny --pair tiny:base)

# A world whose descriptions state the size of 70% of the objects (params/words/): every stage of its own run, the
# sparse ablation and PPO seeds 1-2 of both, stage 06 over the six policies and the base, the seed-pooled comparison
# (with wrong attributes and size claims per description beside the per-claim rates).
WORDS_RUNS := sparse s1 sparse-s1 s2 sparse-s2
WORDS_METRICS := object_halluc,attribute_halluc,colour_halluc,size_halluc,relation_halluc,coverage,attribute_errors,size_claims
LONG_METRICS := $(WORDS_METRICS),sentences
words-seeds: setup
	$(PY) -m fgaif_utils.pipeline params/words/fgaif.yaml --stages 00-05
	$(call stage05,words,$(WORDS_RUNS))
	$(PY) -m fgaif_utils.pipeline params/words/seeds.yaml --stages 06
	$(call pooled,tiny-words-seeds,eval eval_long eval_ood,--metrics $(WORDS_METRICS) --group base=base \
	  $(call seeds3,fgaif,fgaif,tiny-words) \
	  $(call seeds3,sparse,tiny-words-sparse,tiny-words-sparse) \
	  --pair fgaif:base --pair fgaif:sparse)

# Dense against sparse with perfect labels (params/oracle/, after `make run`): PPO for 30 iterations with the
# ground-truth scorer's labels as rewards, per sub-sentence and on the last token, seeds 0-2 of each, stage 06 over
# the six policies, tiny's FGAIF and the base, then the seed-pooled comparison.
ORACLE_RUNS := dense sparse s1 sparse-s1 s2 sparse-s2
oracle-seeds: setup
	$(call stage05,oracle,$(ORACLE_RUNS))
	$(PY) -m fgaif_utils.pipeline params/oracle/seeds.yaml --stages 06
	$(call pooled,tiny-oracle30-seeds,eval eval_long eval_ood,--metrics $(WORDS_METRICS) --group base=base \
	  $(call seeds3,dense,fgaif,tiny-oracle30) \
	  $(call seeds3,sparse,tiny-oracle30-sparse,tiny-oracle30-sparse) \
	  --pair dense:base --pair sparse:base --pair dense:sparse)

# Dense against sparse on crowded scenes (params/long/, after `make run`): PPO on 4-5-object images with tiny's reward
# models, FGAIF and sparse at seeds 0-2, stage 06 over the six policies, tiny's FGAIF and the base, the seed-pooled
# comparison (eval_long is the crowded scenes' distribution).
LONG_RUNS := sparse s1 sparse-s1 s2 sparse-s2
long-seeds: setup
	$(PY) -m fgaif_utils.pipeline params/long/fgaif.yaml --stages 00,05
	$(call stage05,long,$(LONG_RUNS))
	$(PY) -m fgaif_utils.pipeline params/long/seeds.yaml --stages 06
	$(call pooled,tiny-long-seeds,eval_long eval eval_ood,--metrics $(LONG_METRICS) --group base=base \
	  $(call seeds3,fgaif,fgaif,tiny-long) \
	  $(call seeds3,sparse,tiny-long-sparse,tiny-long-sparse) \
	  --group tiny=tiny --pair fgaif:base --pair sparse:base --pair fgaif:sparse --pair fgaif:tiny)

# The same with ground-truth rewards for 30 iterations (params/long/oracle*.yaml, after `make long-seeds`): dense and
# sparse at seeds 0-2, stage 06 over the six policies, the crowded-scene FGAIF and the base, the seed-pooled comparison.
LONG_ORACLE_RUNS := oracle oracle-sparse oracle-s1 oracle-sparse-s1 oracle-s2 oracle-sparse-s2
long-oracle-seeds: setup
	$(call stage05,long,$(LONG_ORACLE_RUNS))
	$(PY) -m fgaif_utils.pipeline params/long/oracle-seeds.yaml --stages 06
	$(call pooled,tiny-long-oracle30-seeds,eval_long eval eval_ood,--metrics $(LONG_METRICS) --group base=base \
	  $(call seeds3,dense,fgaif,tiny-long-oracle30) \
	  $(call seeds3,sparse,tiny-long-oracle30-sparse,tiny-long-oracle30-sparse) \
	  --pair dense:base --pair sparse:base --pair dense:sparse)

# A base policy that can answer yes/no (params/policyqa/, after `make run`): every stage but 00 of its own run, the
# sparse ablation and PPO seeds 1-2 of both, stage 06 over the six policies and the base, the seed-pooled comparison
# with POPE beside the hallucination rates.
POLICYQA_RUNS := sparse s1 sparse-s1 s2 sparse-s2
POLICYQA_METRICS := $(LONG_METRICS),pope_random_accuracy,pope_random_f1,pope_random_yes_ratio,pope_popular_f1,pope_adversarial_f1
policyqa-seeds: setup
	$(PY) -m fgaif_utils.pipeline params/policyqa/fgaif.yaml --stages 01-05
	$(call stage05,policyqa,$(POLICYQA_RUNS))
	$(PY) -m fgaif_utils.pipeline params/policyqa/seeds.yaml --stages 06
	$(call pooled,tiny-policyqa-seeds,eval eval_long eval_ood,--metrics $(POLICYQA_METRICS) --group base=base \
	  $(call seeds3,fgaif,fgaif,tiny-policyqa) \
	  $(call seeds3,sparse,tiny-policyqa-sparse,tiny-policyqa-sparse) \
	  --pair fgaif:base --pair sparse:base --pair fgaif:sparse)

smoke: setup
	$(PY) -m fgaif_utils.pipeline params/smoke.yaml

# Two pytest workers, one thread each (tests/conftest.py), a test file per worker at a time: each file's module-scoped
# fixtures (the smoke and COCO end-to-end runs) are built once, and the two end-to-end files run side by side
# (a 2-core box: 690 s in one process, 413 s in two). PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lab: setup
	$(VENV)/bin/jupyter lab
