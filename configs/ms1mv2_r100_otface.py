from easydict import EasyDict as edict

# ms1mv2_r100 (upstream arcface_torch config) with the OTFace loss: ArcFace margin softmax
# (PartialFC_V2) + lambda * OT term on the hard triplets of each P x K batch.
# Run: torchrun --nproc_per_node=8 train_v2.py configs/ms1mv2_r100_otface

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 0.0005
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 20
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
    feature="conv",         # layer4 feature maps (B x 512 x 7 x 7), one distribution per image
    layer="layer4",
    triplet_mode="hard",
    triplet_margin=0.1,
    ot_margin=0.05,
    eps=0.05,
    iters=50,
)
