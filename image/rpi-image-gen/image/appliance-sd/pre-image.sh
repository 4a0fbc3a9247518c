#!/bin/sh
# rpi-image-gen calls this with the root tree and genimage's input dir: write genimage.cfg.
set -eu
rootfs=$1
genimg_in=$2
sed -e "s|<IMAGE_DIR>|$IGconf_image_outputdir|g" \
    -e "s|<IMAGE_NAME>|$IGconf_image_name|g" \
    -e "s|<IMAGE_SUFFIX>|$IGconf_image_suffix|g" \
    -e "s|<BOOT_SIZE>|$IGconf_image_boot_part_size|g" \
    -e "s|<ROOT_SIZE>|$IGconf_image_root_part_size|g" \
    -e "s|<DATA_SIZE>|$IGconf_image_data_part_size|g" \
    -e "s|<SETUP>|'$(readlink -ef setup.sh)'|g" \
    genimage.cfg.in > "$genimg_in"/genimage.cfg
