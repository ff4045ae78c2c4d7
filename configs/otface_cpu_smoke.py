from easydict import EasyDict as edict

# A tiny OTFace job for a CPU smoke test (laptop, CI): MobileFaceNet, 4 identities x 4 images per
# process. Build the data first (identity-disjoint train / held-out split):
#   otface-data split FACES --holdout-fraction 0.53 --train-list train.txt --holdout-list heldout.txt
#   otface-data build-rec FACES data/smoke/ --identities-from train.txt --resize 112
#   otface-data build-bin FACES data/smoke/heldout.bin --identities-from heldout.txt --pairs 200  # needs >= 20 identities
# then set num_classes / num_image to what build-rec printed, and run
#   torchrun --nproc_per_node=2 train_v2.py configs/otface_cpu_smoke
# (without a GPU the patched recipe uses gloo and the CPU).

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.resume = False
config.save_all_states = True
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = False
config.batch_size = 16
# AdamW (base.py's alternative): on a tiny set from scratch its loss falls within tens of steps
config.optimizer = "adamw"
config.lr = 0.001
config.weight_decay = 0.1
config.verbose = 20
config.frequent = 1
config.dali = False
config.num_workers = 1

config.rec = "data/smoke"
config.num_classes = 18     # identities, as build-rec printed
config.num_image = 512
config.num_epoch = 2
config.warmup_epoch = 0
config.val_targets = ["heldout"]

# otface-plugin
config.loss = "otface"
config.sampler = "pk"
config.num_instances = 4
config.otface = dict(
    margin="arcface",
    lambda_ot=1.0,
    feature="conv",
    layer="conv_sep",   # MobileFaceNet's last conv stage (B x 512 x 7 x 7); iresnets use layer4
)
