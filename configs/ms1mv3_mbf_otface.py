from easydict import EasyDict as edict

# ms1mv3_mbf (upstream arcface_torch config) with the OTFace loss: ArcFace margin softmax
# (PartialFC_V2) + lambda * OT term on the hard triplets of each P x K batch.
# Run: torchrun --nproc_per_node=8 train_v2.py configs/ms1mv3_mbf_otface

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 40
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', 'agedb_30']

# otface-plugin
config.loss = "otface"
config.sampler = "pk"       # P identities x K images per GPU batch, so anchors have positives
config.num_instances = 4    # K; batch_size must be a multiple of it
config.otface = dict(
    margin="arcface",      # the margin family; margin_list is set to match it
    lambda_ot=0.1,          # weight of the OT term
    warmup_steps=0,         # >0: lambda rises linearly from 0 over that many steps
    feature="conv",         # MobileFaceNet's conv_sep (B x 512 x 7 x 7), chosen for mbf; `layer` overrides
    triplet_mode="hard",
    triplet_margin=0.1,
    ot_margin=0.05,
    eps=0.05,
    iters=50,
)
