// Finished clips and their settings, kept in this browser (IndexedDB) so that
// they survive a reload: bounded in count and in bytes, the oldest go first.

const DB = "wavecast";
const STORE = "clips";

export const limits = {
  entries: 50,
  bytes: 256 * 1024 * 1024,
};

let opened = null;

function open() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

function done(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function store(mode) {
  return (await open()).transaction(STORE, mode).objectStore(STORE);
}

function size(entry) {
  const parts = [entry.clip, entry.mbd, entry.file, entry.mbdFile]; // (decoded, and an encoded stream's files)
  return parts.reduce((n, part) => n + (part?.byteLength || 0), 0);
}

// Every kept clip, oldest first.
export async function all() {
  const entries = await done((await store("readonly")).getAll());
  return entries.sort((a, b) => a.savedAt - b.savedAt);
}

// Keep a clip; then drop the oldest while over the bounds. Returns the ids dropped.
export async function save(entry) {
  if (size(entry) > limits.bytes) return [];
  await done((await store("readwrite")).put(entry));
  const entries = await all();
  let bytes = entries.reduce((n, e) => n + size(e), 0);
  const dropped = [];
  while (entries.length > limits.entries || bytes > limits.bytes) {
    const oldest = entries.shift();
    bytes -= size(oldest);
    dropped.push(oldest.id);
  }
  if (dropped.length) {
    const clips = await store("readwrite");
    await Promise.all(dropped.map((id) => done(clips.delete(id))));
  }
  return dropped;
}

export async function remove(id) {
  await done((await store("readwrite")).delete(id));
}
