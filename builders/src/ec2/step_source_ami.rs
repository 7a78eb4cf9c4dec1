//! Resolves the AMI the build starts from: `source_ami` as given (checked
//! to exist and be usable), or the match of `source_ami_filter`, newest
//! first when `most_recent` is set. The choice is logged and recorded in
//! the artifact, so the manifest says exactly what an image was built on.

use super::api::SourceImage;
use super::config::SourceAmiFilter;
use super::{Ec2State, Plan, SourceAmi};
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use std::sync::Arc;

pub struct StepSourceAmi {
    plan: Arc<Plan>,
}

impl StepSourceAmi {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepSourceAmi { plan }
    }

    async fn by_id(&self, id: &str) -> Result<SourceImage, StepError> {
        let region = &self.plan.region;
        self.plan.api().source_image(id).await?.ok_or_else(|| {
            StepError::failed(format!(
                "source AMI {id} does not exist in {region}, or is not shared with this account; AMI ids differ between regions"
            ))
        })
    }

    async fn by_filter(&self, wanted: &SourceAmiFilter) -> Result<SourceImage, StepError> {
        let region = &self.plan.region;
        let mut images = self
            .plan
            .api()
            .available_images(&wanted.owners, &wanted.filters)
            .await?;
        let described = describe_filter(wanted);
        // ISO 8601 timestamps in one format sort as strings.
        images.sort_by(|a, b| {
            a.creation_date
                .cmp(&b.creation_date)
                .then(a.image_id.cmp(&b.image_id))
        });
        match images.len() {
            0 => Err(StepError::failed(format!(
                "no available AMI in {region} matches {described}; check the filters and owners, e.g. with `aws ec2 describe-images --region {region}`"
            ))),
            1 => Ok(images.remove(0)),
            _ if wanted.most_recent => Ok(images.pop().expect("several images")),
            count => {
                let listed: Vec<String> = images
                    .iter()
                    .rev()
                    .take(5)
                    .map(|image| {
                        format!(
                            "{} ({}, {})",
                            image.image_id,
                            image.name.as_deref().unwrap_or("unnamed"),
                            image.creation_date.as_deref().unwrap_or("no date")
                        )
                    })
                    .collect();
                Err(StepError::failed(format!(
                    "{count} AMIs in {region} match {described}, newest first: {}{}; set `most_recent = true` to take the newest, or narrow the filters",
                    listed.join(", "),
                    if count > 5 { ", ..." } else { "" }
                )))
            }
        }
    }
}

fn describe_filter(wanted: &SourceAmiFilter) -> String {
    let filters: Vec<String> = wanted
        .filters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "{} owned by {}",
        filters.join(", "),
        wanted.owners.join(", ")
    )
}

#[async_trait]
impl Step<Ec2State> for StepSourceAmi {
    fn name(&self) -> &'static str {
        "source_ami"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let source = self.resolve().await?;
        cx.log.info(format!(
            "source AMI {} ({}) owned by {}, created {}",
            source.id,
            source.name.as_deref().unwrap_or("unnamed"),
            source.owner.as_deref().unwrap_or("unknown"),
            source
                .creation_date
                .as_deref()
                .unwrap_or("at an unknown time")
        ));
        state.source = Some(source);
        Ok(())
    }
}

impl StepSourceAmi {
    /// The AMI the build would start from now: what a build records and
    /// `plan` compares.
    pub async fn resolve(&self) -> Result<SourceAmi, StepError> {
        let config = &self.plan.config;
        let image = match (&config.source_ami, &config.source_ami_filter) {
            (Some(id), _) => self.by_id(id).await?,
            (None, Some(wanted)) => self.by_filter(wanted).await?,
            (None, None) => {
                return Err(StepError::failed("no `source_ami` or `source_ami_filter`"));
            }
        };
        let id = image.image_id;
        if let Some(state) = image.state.as_deref()
            && state != "available"
        {
            return Err(StepError::failed(format!(
                "source AMI {id} is {state}, not available"
            )));
        }
        if image.instance_store {
            return Err(StepError::failed(format!(
                "source AMI {id} is instance-store backed; the ec2 builder makes EBS-backed AMIs and needs an EBS-backed source"
            )));
        }
        let source = SourceAmi {
            id,
            name: image.name,
            owner: image.owner,
            creation_date: image.creation_date,
            root_device_name: image.root_device_name,
        };
        Ok(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::{FakeEc2, plan};

    #[tokio::test]
    async fn a_source_ami_by_id_is_resolved_or_refused_naming_the_region() {
        let fake = FakeEc2::new("eu-west-1").with_image("eu-west-1", "debian-13", "ami-base");
        let test = TestContext::new("app");
        let mut state = Ec2State::default();
        StepSourceAmi::new(plan(serde_json::json!({"source_ami": "ami-base"}), &fake))
            .run(&mut state, &test.cx)
            .await
            .unwrap();
        let source = state.source.unwrap();
        assert_eq!(
            (source.id.as_str(), source.name.as_deref()),
            ("ami-base", Some("debian-13"))
        );

        let err = StepSourceAmi::new(plan(serde_json::json!({"source_ami": "ami-gone"}), &fake))
            .run(&mut Ec2State::default(), &test.cx)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("source AMI ami-gone does not exist in eu-west-1"),
            "{err}"
        );
    }
}
