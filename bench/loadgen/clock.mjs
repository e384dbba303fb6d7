// Wall-clock milliseconds with sub-millisecond resolution, comparable with
// the publisher's time.time(): performance.now() is monotonic and may drift
// from the wall clock (NTP slewing), so its offset is re-anchored at the
// instant Date.now() ticks over to a new millisecond.
import { performance } from "node:perf_hooks";

function calibrate() {
  const start = Date.now();
  let ms;
  while ((ms = Date.now()) === start);
  return ms - performance.now();
}

let offset = calibrate();
setInterval(() => {
  offset = calibrate();
}, 2000).unref();

export const now = () => performance.now() + offset;
