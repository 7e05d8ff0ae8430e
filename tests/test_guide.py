"""The DagsHub "Building a Custom Dataloader" guide (shared/reference/004_*.txt) runs as written against a synthetic
LAION-style repo, with only ``from dagshub.streaming import install_hooks`` replaced by
``from streamloader import install_hooks``.

It runs in its own process: the dagshub package caches its token store on first import, so the guide's
``dagshub.auth.add_app_token`` must be the first use of it (DAGSHUB_CLIENT_HOST and DAGSHUB_CLIENT_TOKENS_CACHE point
it at the local server and a temp file).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import streamloader
from conftest import TOKEN
from streamloader.synthetic import make_laion_repo

# Verbatim from the guide, except the import line and the lines marked "# test:", which report what it saw.
GUIDE = '''
import os
DAGSHUB_TOKEN = os.environ.get('DAGSHUB_TOKEN', None)

import dagshub
dagshub.auth.add_app_token(DAGSHUB_TOKEN)

from streamloader import install_hooks
install_hooks(project_root='.', repo_url='{repo_url}', branch='main')

squirrel_files = []

with open('data/labels.tsv') as f:
    for row in f.readlines():
        image_name, caption = row.split('\\t')[:2]
        if 'squirrel' in caption.lower():
            squirrel_files.append(image_name)

len(squirrel_files)

import os

from PIL import Image

import hashlib  # test:
digests = {{}}  # test:
for squirrel_file in squirrel_files:
    full_path = os.path.join('data', squirrel_file)
    image = Image.open(full_path).convert('RGB')

    # Do something with the image
    digests[squirrel_file] = hashlib.sha256(image.tobytes()).hexdigest()  # test:

import torch
from torch.utils.data import Dataset, DataLoader


class EfficientNetFeatureExtractor:  # test: a tiny stand-in (mean colour) with the guide's extract()
    def preprocess(self, image):
        return torch.tensor(list(image.getdata()), dtype=torch.float32).T.reshape(3, image.height, image.width)

    def model(self, x):
        return x.mean(dim=(2, 3), keepdim=True)

    def extract(self, image_path):
        with torch.no_grad():
            image = Image.open(image_path).convert('RGB')
            X = self.preprocess(image)
            X = X.unsqueeze(0)
            embedding = self.model(X)[0, :, 0, 0]
        return embedding


class LAIONAestheticsDataset(Dataset):
    def __init__(self, annotations_file, img_dir, feature_extractor: EfficientNetFeatureExtractor, limit=None):
        self.feature_extractor = feature_extractor
        self.img_path = img_dir
        self.img_files = []
        self.scores = []
        self.embeddings = {{}}
        with open(annotations_file) as f:
            for i, row in enumerate(f.readlines()):
                if limit is not None and i >= limit:
                    break
                img_name, _, aesthetic_score = row.split('\\t')[:3]
                self.img_files.append(img_name)
                self.scores.append(torch.tensor([float(aesthetic_score)]))

    def __len__(self):
        return len(self.img_files)

    def __getitem__(self, idx):
        if torch.is_tensor(idx):
            idx = idx.tolist()
        score = self.scores[idx]
        embedding = self.embeddings.get(idx, None)
        if embedding is None:
            img_path = os.path.join(self.img_path, self.img_files[idx])
            embedding = self.feature_extractor.extract(img_path)
            self.embeddings[idx] = embedding
        return embedding, score


train_dataset = LAIONAestheticsDataset('data/labels.tsv', 'data', EfficientNetFeatureExtractor(), limit={limit})  # test:
train_dataloader = DataLoader(train_dataset,
                              batch_size=32,
                              shuffle=True,
                              num_workers=0)
embeddings, scores = next(iter(train_dataloader))  # test:

import json  # test:
print(json.dumps({{"count": len(squirrel_files), "files": squirrel_files, "digests": digests,  # test:
                  "batch": list(embeddings.shape), "scores": sorted(round(s, 4) for s in scores[:, 0].tolist())}}))
'''


def _guide_squirrels(labels_path):
    """The guide's filter applied to the repo's own file, without any hooks."""
    found = []
    with open(labels_path) as f:
        for row in f.readlines():
            image_name, caption = row.split("\t")[:2]
            if "squirrel" in caption.lower():
                found.append(image_name)
    return found


def _rgb_digest(path):
    from PIL import Image

    with Image.open(path) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def test_the_guide_runs_as_written(tmp_path, make_server):
    assert "install_hooks" in dir(streamloader), "streamloader must export install_hooks (the guide imports it)"
    repo = make_laion_repo(tmp_path / "repo", n_images=30, n_squirrel=6, image_size=(40, 40), seed=3)
    # The guide's Dataset reads the score as the third tab field, which a caption holding a tab breaks (as it
    # would with real data): it gets the rows before the first such caption.
    limit = next(i for i, name in enumerate(repo.files) if "\t" in repo.captions[name])
    assert limit >= 2
    srv = make_server(repo.root, token=TOKEN)
    work = tmp_path / "work"
    work.mkdir()
    (work / "guide.py").write_text(GUIDE.format(repo_url=srv.repo_url, limit=limit))
    env = dict(os.environ, DAGSHUB_TOKEN=TOKEN, DAGSHUB_CLIENT_HOST=srv.url,
               DAGSHUB_CLIENT_TOKENS_CACHE=str(tmp_path / "dagshub-tokens"))
    out = subprocess.run([sys.executable, "guide.py"], cwd=work, env=env, capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])

    expected = _guide_squirrels(repo.labels_path)
    # the synthetic repo hides one squirrel after a tab in its caption, which the guide's split('\t')[:2] misses
    assert seen["count"] == len(expected) == len(repo.squirrel_files) - 1
    assert seen["files"] == expected
    assert seen["digests"] == {name: _rgb_digest(repo.image_path(name)) for name in expected}
    assert seen["batch"] == [limit, 3]
    assert seen["scores"] == sorted(round(repo.scores[name], 4) for name in repo.files[:limit])
    assert os.listdir(work) == ["guide.py"]  # nothing was written into the project: reads went through the cache
    assert (tmp_path / "dagshub-tokens").exists()  # the guide's add_app_token really ran against the server
