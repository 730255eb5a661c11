source .gpu/setup.sh >/dev/null
timeout 150 node bench/cuda-tuning.mjs --lengths 16384,65536 --variants NSA_FA_WGMMA=1 --shapes group,fsa --groups 16 --presets fla,paper 2>&1 | tee $OUT/g16-fsa.txt | grep -v "^ok"
timeout 60 node bench/cuda-tuning.mjs --lengths 8192 --variants NSA_FA_WGMMA=1 --shapes fsa --groups 4 --presets fla,paper 2>&1 | tee $OUT/g4-8k.txt | grep -v "^ok"
timeout 120 node bench/cuda-backward-stages.mjs --lengths 16384,65536 --groups 4 --presets fla --variants ,NSA_FA_BWD_WGS=2x2 2>&1 | tee $OUT/bwd-wgs.txt
timeout 240 npm run test:gpu 2>&1 | tail -25 > $OUT/suite.txt; tail -8 $OUT/suite.txt
