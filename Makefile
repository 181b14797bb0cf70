# Glimpse: the two quick-start commands, and the install they share.
#   make demo   - train the video demo (local Ray, local MLflow, synthetic clips made if absent)
#   make test   - the whole test suite (integration tests with a real Ray head and MLflow server included)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# PyTorch first, pinned to the tested pair (CUDA build on x86_64; runs on CPU too).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# FFmpeg's shared libraries for torchcodec, the default video decoder: found, installed (root + apt-get),
# or reported missing, in which case video decodes with PyAV (one notice at run time). Never fails.
TORCHCODEC_LOADS = $(BIN)/python -c "import sys; from datasets.decoders import decoder_available as a; \
	ok, why = a('torchcodec'); print(why) if not ok else None; sys.exit(0 if ok else 1)"

install: $(BIN)/.installed
	@if $(TORCHCODEC_LOADS) >/dev/null 2>&1; then \
		echo "install: FFmpeg's shared libraries load: video decodes with torchcodec"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "install: FFmpeg's shared libraries are missing: apt-get install ffmpeg (for torchcodec)"; \
		if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; \
		then echo "install: installed Debian/Ubuntu's ffmpeg ($$(dpkg-query -W -f='$${Version}' ffmpeg))"; \
		else echo "install: apt-get could not install ffmpeg: video decodes with PyAV"; fi; \
		$(TORCHCODEC_LOADS) >/dev/null 2>&1 && echo "install: torchcodec decodes with it" \
			|| echo "install: torchcodec still cannot load FFmpeg: video decodes with PyAV"; \
	else \
		why=$$($(TORCHCODEC_LOADS) 2>/dev/null | tail -1); \
		echo "install: torchcodec cannot load FFmpeg's shared libraries ($${why:-see: $(BIN)/python -c 'import torchcodec'})"; \
		echo "install: not root or no apt-get, so nothing installed: video decodes with PyAV. For torchcodec:"; \
		echo "install:   conda install -c conda-forge ffmpeg   (in the environment of .venv's Python), or"; \
		echo "install:   sudo apt-get install ffmpeg, or FFmpeg 4-9 shared libraries on LD_LIBRARY_PATH (see README)"; \
	fi

demo: install
	$(BIN)/python jobs/train_kinetics.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
