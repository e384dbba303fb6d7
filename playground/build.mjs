// Builds dist/: the page, its stylesheet and one bundle of the npm client
// libraries, so the records service serves everything locally.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
mkdirSync(dist, { recursive: true });

await build({
  entryPoints: [join(here, "src/main.js")],
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: true,
  sourcemap: true,
  outfile: join(dist, "playground.js"),
  logLevel: "warning",
});
copyFileSync(join(here, "index.html"), join(dist, "index.html"));
copyFileSync(join(here, "src/playground.css"), join(dist, "playground.css"));
console.log(`playground built in ${dist}`);
