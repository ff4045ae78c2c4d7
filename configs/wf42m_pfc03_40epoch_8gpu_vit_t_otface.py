from easydict import EasyDict as edict

# wf42m_pfc03_40epoch_8gpu_vit_t (upstream arcface_torch config) with the OTFace loss: CosFace
# margin softmax (PartialFC_V2, 30% class sampling) + lambda * OT term on the hard triplets of
# each P x K batch. The ViT has no conv stage: the OT term reads its final `norm` patch tokens
# (B x 144 x 256 here, mask ratio 0), each image a distribution over its tokens.
# Run: torchrun --nproc_per_node=8 train_v2.py configs/wf42m_pfc03_40epoch_8gpu_vit_t_otface

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_t_dp005_mask0"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 512
config.optimizer = "adamw"
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = 4
config.val_targets = []

# otface-plugin
config.loss = "otface"
config.sampler = "pk"       # P identities x K images per GPU batch, so anchors have positives
config.num_instances = 4    # K; batch_size must be a multiple of it
config.otface = dict(
    margin="cosface",      # the margin family; margin_list is set to match it
    lambda_ot=0.1,          # weight of the OT term
    warmup_steps=0,         # >0: lambda rises linearly from 0 over that many steps
    feature="conv",         # the ViT's final norm tokens (B x L x D), chosen for vit_*; `layer` overrides
    triplet_mode="hard",
    triplet_margin=0.1,
    ot_margin=0.05,
    eps=0.05,
    iters=50,
)
