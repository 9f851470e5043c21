//! Where a registry sends blob reads. Hosted registries answer a blob GET with a
//! redirect to their storage (S3, a CDN) at a URL signed for a while, so each range
//! request would cost the registry's round trip (and its token check) before the
//! storage's. The storage URL is remembered per blob URL for a few minutes and asked
//! directly, without the registry's `Authorization` (it never goes to another host);
//! any failure there (an expired signature, a reset) forgets it, and the read goes
//! through the registry again. Every byte is verified against the layer's chunk digests
//! whichever host sent it.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

/// How long a storage URL is used: well inside the signatures hosted registries give
/// (Docker Hub's and ECR's last 10 minutes or more).
pub(super) const KEPT_FOR: Duration = Duration::from_secs(5 * 60);

/// Blob URLs remembered: a node's working set of lazy layers.
const BLOBS: NonZeroUsize = NonZeroUsize::new(1024).expect("non-zero");

pub(super) struct Redirects {
    urls: Mutex<LruCache<String, (reqwest::Url, Instant)>>,
}

impl Default for Redirects {
    fn default() -> Self {
        Self {
            urls: Mutex::new(LruCache::new(BLOBS)),
        }
    }
}

impl Redirects {
    /// Where reads of `blob_url` went lately, if that was elsewhere and recent.
    pub(super) fn get(&self, blob_url: &str) -> Option<reqwest::Url> {
        let mut urls = self.lock();
        match urls.get(blob_url) {
            Some((to, at)) if at.elapsed() < KEPT_FOR => Some(to.clone()),
            Some(_) => {
                urls.pop(blob_url);
                None
            }
            None => None,
        }
    }

    /// A read of `blob_url` was answered from `landed`: remembered if that is on another
    /// host (the registry redirected it to its storage). A redirect on the registry's own
    /// host may need the registry's authorization, which the storage's URL never gets.
    pub(super) fn landed(&self, blob_url: &str, landed: &reqwest::Url) {
        let same_origin =
            reqwest::Url::parse(blob_url).is_ok_and(|asked| asked.origin() == landed.origin());
        if same_origin {
            return;
        }
        self.lock()
            .put(blob_url.to_owned(), (landed.clone(), Instant::now()));
    }

    pub(super) fn forget(&self, blob_url: &str) {
        self.lock().pop(blob_url);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, (reqwest::Url, Instant)>> {
        self.urls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_url_on_another_host_is_kept_and_forgetting_drops_it() {
        let redirects = Redirects::default();
        let blob = "http://r.test/v2/app/blobs/sha256:00";
        redirects.landed(blob, &reqwest::Url::parse(blob).expect("url"));
        assert_eq!(redirects.get(blob), None, "not redirected");
        let same_host = reqwest::Url::parse("http://r.test/elsewhere/00").expect("url");
        redirects.landed(blob, &same_host);
        assert_eq!(
            redirects.get(blob),
            None,
            "redirected on the registry's host"
        );
        let storage = reqwest::Url::parse("https://s3.test/b/data?X-Sig=1").expect("url");
        redirects.landed(blob, &storage);
        assert_eq!(redirects.get(blob), Some(storage));
        assert_eq!(
            redirects.get("http://r.test/v2/other/blobs/sha256:00"),
            None
        );
        redirects.forget(blob);
        assert_eq!(redirects.get(blob), None);
    }
}
