# domU: publish what this guest's blkfront uses for each disk beyond xenstore:
# the request size limit the block layer got (max_segments = segments per
# request, i.e. the indirect segments in use when above 11) and blkfront's own
# limit (module parameter max_indirect_segments). data/features-<dev>.
. /lab-domu.sh
for d in /sys/block/xvd*; do
  n=${d##*/}
  lab_put "features-$n" "max_segments=$(cat $d/queue/max_segments) max_sectors_kb=$(cat $d/queue/max_sectors_kb) blkfront.max_indirect_segments=$(cat /sys/module/xen_blkfront/parameters/max_indirect_segments 2>/dev/null || echo ?) nr_hw_queues=$(ls -d $d/mq/* 2>/dev/null | wc -l)"
done
