// Drives the playground page in headless Chromium (Debian's package, through
// playwright-core; no browser download): two tabs edit one document
// together, tab one publishes a record and tab two a notice through the
// page's form, both tabs see both. Prints one JSON line per step.
//
//   node e2e/two-tabs.mjs URL SCREENSHOT.png CHROMIUM_PATH PROFILE_DIR
import { chromium } from "playwright-core";

const [url, screenshotPath, executablePath, profileDir] = process.argv.slice(2);
const emit = (obj) => console.log(JSON.stringify(obj));
const TIMEOUT = 20000;
const RECORD = { discussions: [{ id: 42, title: "Published from the playground form" }] };
const NOTICE = { message: "notice from tab two" };

const context = await chromium.launchPersistentContext(profileDir, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 860 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
context.setDefaultTimeout(TIMEOUT);

const state = (page, id) => page.locator(`#${id}`).getAttribute("data-state");
const editorValue = (page) => page.locator("#editor").inputValue();
const eventsOf = (page, name) =>
  page.evaluate((n) => window.playground.events.filter((e) => e.name === n).map((e) => e.payload), name);

async function publish(page, kind, payload, room = "group-1") {
  await page.selectOption("#publish-kind", kind);
  if (kind === "records") await page.fill("#publish-room", room);
  await page.fill("#publish-payload", JSON.stringify(payload));
  await page.click("#publish-button");
  await page.waitForFunction(() => /published|refused/.test(document.getElementById("publish-result").textContent));
  return page.locator("#publish-result").textContent();
}

try {
  const one = context.pages()[0] ?? (await context.newPage());
  const two = await context.newPage();
  for (const [name, page] of [["one", one], ["two", two]]) {
    page.on("pageerror", (err) => console.error(`tab ${name} page error: ${err.message}`));
    page.on("console", (msg) => {
      if (msg.type() === "error") console.error(`tab ${name} console: ${msg.text()}`);
    });
  }
  await Promise.all([one.goto(url), two.goto(url)]);
  for (const page of [one, two]) {
    await page.waitForSelector('#socket-status[data-state="connected"]');
    await page.waitForSelector('#editor-status[data-state="synced"]');
  }
  emit({
    step: "loaded",
    socket: [await state(one, "socket-status"), await state(two, "socket-status")],
    editor: [await state(one, "editor-status"), await state(two, "editor-status")],
  });

  await one.click("#editor");
  await one.keyboard.type("Hello from tab one.");
  await two.waitForFunction(() => document.getElementById("editor").value === "Hello from tab one.");
  await two.click("#editor");
  await two.keyboard.press("Control+End");
  await two.keyboard.type(" And from tab two.");
  const expected = "Hello from tab one. And from tab two.";
  await one.waitForFunction((text) => document.getElementById("editor").value === text, expected);
  emit({
    step: "edit",
    seen_by_other_tab: await editorValue(one),
    tab_one: await editorValue(one),
    tab_two: await editorValue(two),
  });

  const recordsResult = await publish(one, "records", RECORD);
  const noticeResult = await publish(two, "notice", NOTICE);
  for (const page of [one, two]) {
    await page.waitForFunction(() => {
      const names = window.playground.events.map((e) => e.name);
      return names.includes("records") && names.includes("notice");
    });
  }
  emit({
    step: "published",
    results: [recordsResult, noticeResult],
    records_seen: [...(await eventsOf(one, "records")), ...(await eventsOf(two, "records"))],
    notice_seen: [...(await eventsOf(one, "notice")), ...(await eventsOf(two, "notice"))],
  });

  await one.screenshot({ path: screenshotPath, fullPage: true });
  emit({ step: "screenshot", path: screenshotPath });
} finally {
  await context.close();
}
