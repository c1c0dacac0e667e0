# gnuplot -e "out='docs/img/precision_resnet50.png'" docs/data/precision_resnet50.gp
set terminal pngcairo size 900,480 noenhanced
set output out
set title "ResNet-50, batch 64, 1x H100: torch-mpu precision policies against DDP with autocast"
set style data histograms
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set ylabel "images/s"
set yrange [0:*]
set key top left
set xtics rotate by -15
plot 'docs/data/precision_resnet50_1xH100_2026-12-07.dat' using 3:xtic(1) title "torch-mpu", \
     '' using 5 title "PyTorch DDP (bf16/fp16 autocast)"
