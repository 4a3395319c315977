# Siamese Analog Finder. First time on Debian 12: `bash scripts/setup.sh <target>` installs
# everything and runs the target; afterwards `make <target>` is enough.
PY      ?= .venv/bin/python
OUT     ?= out
export QT_QPA_PLATFORM ?= offscreen
export PYTHONDONTWRITEBYTECODE = 1

SAMPLE_RASTER    = resources/earth/landsat_bahamas_rgb_300m.tif
SAMPLE_REFERENCE = resources/mars/ganges_chasma_dunes_ctx_7m.tif
SAMPLE_HIRISE    = $(wildcard resources/mars/hirise_*.jpg)
SAMPLE_REGIONS   = resources/earth/bahamas_regions.geojson

.PHONY: help demo test test-engine test-gui fewshot-eval lint train train-mars train-folds train-leakfree evaluate bench bench-distributed package clean

help:
	@echo "make demo | test | test-engine | lint | train | train-mars | train-folds | train-leakfree | evaluate | bench | bench-distributed | package | clean"

## The main job on the shipped sample data, embed once, query many: the Bahamas banks are embedded
## once (embeddings.tif), then searched for the Ganges Chasma dune field (dissimilarity.tif,
## cells.gpkg, analog_map.png), for more ground like the best site (similar.*), and four regions are
## compared with four Mars references (regions.csv, regions.html: the paper's table and heatmap).
demo:
	@mkdir -p $(OUT)/demo
	$(PY) -m siamese_analog_plugin embed-area --raster $(SAMPLE_RASTER) --cell-size 6000 --out $(OUT)/demo/embeddings.tif
	$(PY) -m siamese_analog_plugin search --embeddings $(OUT)/demo/embeddings.tif --reference $(SAMPLE_REFERENCE) \
		--out-raster $(OUT)/demo/dissimilarity.tif --out-cells $(OUT)/demo/cells.gpkg \
		--out-png $(OUT)/demo/analog_map.png --top 10 --json > $(OUT)/demo/best_sites.json
	@cat $(OUT)/demo/best_sites.json
	$(PY) -m siamese_analog_plugin similar --embeddings $(OUT)/demo/embeddings.tif \
		--cells $$($(PY) -c "import json; print(json.load(open('$(OUT)/demo/best_sites.json'))['best'][0]['id'])") \
		--out-raster $(OUT)/demo/similar.tif --out-cells $(OUT)/demo/similar.gpkg --out-png $(OUT)/demo/similar.png --top 5
	$(PY) -m siamese_analog_plugin compare --embeddings $(OUT)/demo/embeddings.tif --regions $(SAMPLE_REGIONS) \
		--name-field name --reference $(SAMPLE_REFERENCE) $(SAMPLE_HIRISE) \
		--out-csv $(OUT)/demo/regions.csv --out-html $(OUT)/demo/regions.html

test:
	$(PY) -m pytest

test-engine:
	$(PY) -m pytest tests/engine tests/learning

test-gui:
	$(PY) -m pytest tests/gui

DATA ?= ../shared/data

## Train the default encoder as shipped: the leak-free split (HiRISE and AID training side only), all four
## Earth dune-field sites, 48 epochs, seed 0 (about 15 min on 2 idle CPU cores, 26 min on one; uses the GPU
## when there is one). Writes models/siamese_compact.pt (+ .onnx), its split and a resumable state file.
TRAIN_ARGS = --data $(DATA) --split leakfree --epochs 48 --pairs-per-epoch 5120 --seed 0
train:
	$(PY) -m siamese_analog_plugin train $(TRAIN_ARGS) --dune-sites all

## The few-shot option for Mars landforms (models/siamese_compact_mars.pt + .onnx): step 1 of the stepwise
## transfer, the shipped encoder fine-tuned on the HiRISE classes of its own training side (about 1 min).
train-mars:
	$(PY) -m siamese_analog_plugin transfer --step 1 --model models/siamese_compact.pt \
		--data $(DATA)/mars/hirise_landmarks --device cpu --out models/siamese_compact_mars.pt

## The leave-one-site-out models behind the card's dune-site rows: the same recipe four times, each with
## one site left out (models/folds/, about 4 x 15 min). `make evaluate` scores every site with the
## fold model that never saw it.
SITES = Kalahari Simpson SkeletonCoast WDC
train-folds:
	@mkdir -p models/folds
	for s in $(SITES); do \
		$(PY) -m siamese_analog_plugin train $(TRAIN_ARGS) --dune-sites $$(echo $(SITES) | tr ' ' '\n' | grep -vx $$s) \
			--out models/folds/siamese_compact.no_$$s.pt || exit 1; \
		rm -f models/folds/siamese_compact.no_$$s.onnx models/folds/siamese_compact.no_$$s.state.pt; \
	done

## The pre-training experiment of issue 13 (not shipped: see models/README.md): self-supervised NT-Xent
## pre-training on Mars and Earth imagery (training side of the leak-free split only), then fine-tuning
## with the labelled and analog pairs on the leak-free split (validation numbers every epoch). Seed 0,
## one thread: about 32 + 25-45 min on the shared 2-core machine. Writes $(OUT)/leakfree/.
PRETRAIN_STEPS ?= 574
FINETUNE_EPOCHS ?= 24
train-leakfree:
	@mkdir -p $(OUT)/leakfree
	OMP_NUM_THREADS=1 $(PY) -m siamese_analog_plugin pretrain --data $(DATA) --steps $(PRETRAIN_STEPS) --schedule-steps 1200 \
		--batch 128 --temperature 0.2 --seed 0 --threads 1 --out $(OUT)/leakfree/siamese_pretrained.pt
	OMP_NUM_THREADS=1 $(PY) -m siamese_analog_plugin train --data $(DATA) --split leakfree \
		--init $(OUT)/leakfree/siamese_pretrained.pt --epochs $(FINETUNE_EPOCHS) --pairs-per-epoch 5120 --seed 0 \
		--threads 1 --out $(OUT)/leakfree/siamese_leakfree.pt

## Leak-free evaluation (learning/leakfree.py): the test side of the train/val/test split; the shipped
## model (its dune-site rows from the fold models in models/folds/, each scoring the site it never saw) and
## the Mars landform model beside an untrained network and the texture baseline, mean ± spread (std over
## dune sites, support draws or a scene bootstrap). PART=val gives the validation numbers used for choices.
PART ?= test
evaluate:
	OMP_NUM_THREADS=1 $(PY) -m siamese_analog_plugin evaluate --data $(DATA) --part $(PART) --draws 20 \
		--compare mars_landform_model=models/siamese_compact_mars.pt

fewshot-eval:
	@mkdir -p $(OUT)/fewshot
	$(PY) -m siamese_analog_plugin transfer --step 1 --data $(DATA)/mars/hirise_landmarks --out $(OUT)/fewshot/sdft_step1_hirise.pt
	$(PY) -m siamese_analog_plugin transfer --step 1 --data $(DATA)/earth/aid --max-per-class 100 \
		--out $(OUT)/fewshot/sdft_step1_aid.pt
	$(PY) -m siamese_analog_plugin evaluate-fewshot --hirise $(DATA)/mars/hirise_landmarks --aid $(DATA)/earth/aid \
		--transfer-model HiRISE=$(OUT)/fewshot/sdft_step1_hirise.pt AID=$(OUT)/fewshot/sdft_step1_aid.pt \
		--adapt-steps 20 --out $(OUT)/fewshot/fewshot_eval.json --markdown $(OUT)/fewshot/fewshot_eval.md

bench:
	$(PY) -m siamese_analog_plugin bench

## The search on Dask LocalClusters of 1 and 2 workers against the single-process pipeline
## (docs/distributed.md): cells/s, ratio, per-task overhead, cost model. A few minutes on 2 cores.
bench-distributed:
	$(PY) -m siamese_analog_plugin bench --distributed

package:
	$(PY) scripts/package.py

lint:
	$(PY) -m ruff check siamese_analog_plugin tests scripts

clean:
	rm -rf $(OUT) dist .pytest_cache
